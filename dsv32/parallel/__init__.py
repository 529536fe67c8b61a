"""Scale-out on one node with torch.distributed: tensor parallelism for MLA, the dense FFNs and the
vocabulary; expert parallelism for the routed experts; the sharded loader; FSDP2 (+EP) training.
Applied from outside the unchanged model by `parallelize(model, par)`."""

from dsv32.parallel.mesh import Parallel, init_distributed, make_parallel
from dsv32.parallel.parallelize import parallelize

__all__ = ["Parallel", "init_distributed", "make_parallel", "parallelize"]
