"""Two fixes to Triton's CPU interpreter (seen in Triton 3.6 and 3.9) so that kernels run on CPU as
they do on the GPU: `tl.dot` on bf16 multiplied the raw uint16 bit patterns, and fp32 -> bf16
casts truncated where the GPU rounds to nearest even."""

import os

import numpy as np
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    import triton.language as tl
    from triton.runtime import interpreter

    _dot, _cast = interpreter.InterpreterBuilder.create_dot, interpreter.InterpreterBuilder.cast_impl

    def create_dot(self, a, b, d, *args):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:  # exact products, fp32 sums
            a, b = _cast(self, a, tl.float32), _cast(self, b, tl.float32)
        return _dot(self, a, b, d, *args)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16)
            return interpreter.TensorHandle(bits.numpy().view(np.uint16), tl.bfloat16)
        return _cast(self, src, dst_type)

    interpreter.InterpreterBuilder.create_dot = create_dot
    interpreter.InterpreterBuilder.cast_impl = cast_impl
