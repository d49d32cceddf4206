"""The runner: trains a causal-LM or masked-LM head on token stores with DeepSpeed (`deepspeed fastlm/run.py`).

The library half (fastlm/*.py) never imports this package.
"""
