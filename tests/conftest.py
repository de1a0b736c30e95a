"""Suite-wide setup.

TRITON_INTERPRET=1 must be set before any Triton kernel is defined: it makes `triton.jit` build
interpreted kernels, so tests/triton_ops runs the real kernels on CPU tensors. The default
kernels="auto" still sends CPU tensors down the PyTorch path, so no other test is slowed.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
