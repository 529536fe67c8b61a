"""dsv32: DeepSeek-V3.2 in readable PyTorch.

Top-level names are exported lazily so that `import dsv32` (and `import dsv32.chat`) stays
free of torch and other third-party imports.
"""

__version__ = "0.1.0"

_LAZY = {
    "load": "dsv32.loader",
    "save": "dsv32.loader",
    "load_model": "dsv32.checkpoint",
    "save_model": "dsv32.checkpoint",
    "ModelConfig": "dsv32.config",
    "Transformer": "dsv32.model",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsv32' has no attribute {name!r}")
