"""What autograd saves for backward while a function runs, as docs/design.md §5 counts it."""

import torch


def saved_tensors(fn) -> list[torch.Tensor]:
    """Tensors passed to saved_tensors_hooks' pack hook while `fn` runs."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved
