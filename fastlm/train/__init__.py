"""The runner: trains a causal-LM or masked-LM head on token stores with DeepSpeed (`deepspeed fastlm/run.py`).

The library half (fastlm/*.py) never imports this package. Importing it picks DeepSpeed's CPU accelerator
when there is no GPU, before any module of the package imports deepspeed.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
