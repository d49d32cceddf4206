"""The runner: trains a causal-LM or masked-LM head on token stores with DeepSpeed (`deepspeed fastlm/run.py`).

The library half (fastlm/*.py) never imports this package. Importing it picks DeepSpeed's CPU accelerator
when there is no GPU, and imports deepspeed, before any module of the package does.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
    # deepspeed's autotuner (which the runner never uses) imports mlflow where it is installed: about 1.5 s of
    # every process's start. Hidden for that import only; --report_to mlflow imports it as usual.
    sys.modules["mlflow"] = None
    try:
        import deepspeed  # noqa: F401
    finally:
        del sys.modules["mlflow"]
