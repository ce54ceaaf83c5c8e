"""PIEscope: find, explain and check circuits in language models."""

import os

# PyTorch's CPU allocator backs allocations of 2 MB and more with transparent huge pages when
# this is set (read once, at its first allocation, so it must precede any torch import). Large
# tensors made afresh every step (the CLT trainer's decoder gradients and weight copies, a
# model's activations) otherwise pay a page fault per 4 KB: measured here, a 448 MB copy took
# 0.43 s with 4 KB pages and 0.09 s with huge pages. THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
