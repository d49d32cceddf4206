"""Builds every csrc/_<name>.pyx into the private module fastlm._kernels._<name>.

FASTLM_CYTHON_DEBUG=1 turns bounds/wraparound checks back on for a debug test run.
"""
import glob
import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("FASTLM_CYTHON_DEBUG") == "1"
directives = dict(
    language_level=3,
    boundscheck=debug,
    wraparound=debug,
    initializedcheck=debug,
    cdivision=not debug,
)
extensions = [
    Extension(
        "fastlm._kernels." + os.path.splitext(os.path.basename(pyx))[0],
        [pyx],
        # numpy's headers only for random/bitgen.h; no numpy C-API is used.
        include_dirs=["csrc", np.get_include()],
        # No fused multiply-add contraction (GCC's default where FMA exists, e.g. on ARM): the blending
        # kernel must round `w * x - c` as two operations, exactly as Megatron's order and the reference do.
        extra_compile_args=["-O0" if debug else "-O3", "-ffp-contract=off"],
    )
    for pyx in sorted(glob.glob("csrc/*.pyx"))
]
setup(ext_modules=cythonize(extensions, include_path=["csrc"], compiler_directives=directives))
