"""Triton kernels for the Facto ops, one module per op family, each a kernel plus its launcher.

The ops in facto_fx.ops import these modules only when `dispatch.use_triton` picks them, so
importing facto_fx needs neither triton nor a GPU.
"""
