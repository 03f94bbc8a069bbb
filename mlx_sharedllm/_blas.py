"""Use the system OpenBLAS for MLX's CPU matmuls on Linux.

The `mlx[cpu]` wheel links a slow reference BLAS; loading OpenBLAS with global symbol
visibility before MLX is imported makes float32 matmul many times faster. It must
run before the first `import mlx`. Set MLX_SHAREDLLM_OPENBLAS=0 to turn it off.
"""

import ctypes
import os
import sys


def preload_openblas() -> bool:
    """Load libopenblas.so.0 globally if it exists; True when it was loaded."""
    if not sys.platform.startswith("linux") or os.environ.get("MLX_SHAREDLLM_OPENBLAS") == "0":
        return False
    try:
        ctypes.CDLL("libopenblas.so.0", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return True
