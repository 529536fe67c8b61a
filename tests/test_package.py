import subprocess
import sys


def test_import_dsv32_does_not_pull_torch():
    code = "import sys, dsv32; assert 'torch' not in sys.modules and 'numpy' not in sys.modules; print(dsv32.__version__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_lazy_load_model_export():
    import dsv32
    from dsv32.checkpoint import load_model

    assert dsv32.load_model is load_model
