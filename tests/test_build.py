import subprocess
import sys

import pytest

from fastlm._kernels import load


def test_missing_kernel_says_how_to_rebuild():
    with pytest.raises(ImportError, match=r"pip install -e \."):
        load("_no_such_kernel")


def test_import_fastlm_stays_light():
    """torch, transformers, deepspeed and datasets load only where they are used."""
    code = "import sys, fastlm; print(sorted(m for m in ('torch', 'transformers', 'deepspeed', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
