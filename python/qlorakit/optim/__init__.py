"""Optimizers for adapter training: Adam / AdamW whose states live in CUDA managed memory.

``PagedAdamW`` and ``PagedAdam`` are drop-in ``torch.optim.Optimizer`` subclasses with
torch.optim.AdamW / Adam semantics; on CUDA their moments page to host RAM under memory
pressure instead of failing, on the CPU they run the same math on ordinary memory.
"""

from qlorakit.optim.adamw import PagedAdam, PagedAdamW

__all__ = ["PagedAdam", "PagedAdamW"]
