"""Suite-wide setup.

TRITON_INTERPRET=1 must be set before any Triton kernel is defined: it makes `triton.jit` build
interpreted kernels, so tests/triton_ops runs the real kernels on CPU tensors. The default
kernels="auto" still sends CPU tensors down the PyTorch path, so no other test is slowed.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402  (after the variable: torch may import Triton)

# pytest-xdist's workers share the cores: each takes its part, not all of them, for torch's threads.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
