"""Errors that reach the user as one line, and the one test for running out of memory."""

from __future__ import annotations

import sys


class RopelensError(Exception):
    """An error the user can fix; printed as one line, never with a traceback."""


class ConfigError(RopelensError):
    """Bad configuration: the message names the key and the fix."""


class DataError(RopelensError):
    """Bad or missing input data."""


# What allocators say when they fail without raising torch.OutOfMemoryError: CUDA/HIP/MPS paths
# outside the caching allocator ("CUDA out of memory", "MPS backend out of memory"), c10's
# "Out of Memory" and the CPU allocator ("DefaultCPUAllocator: can't allocate memory: ...").
OOM_MESSAGES = ("out of memory", "can't allocate memory")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` means the job ran out of memory: ``torch.OutOfMemoryError`` (every
    accelerator's allocator; ``torch.cuda.OutOfMemoryError`` is the same class), ``MemoryError``
    (Python, numpy, pyarrow), or a ``RuntimeError`` with an allocator's message (OOM_MESSAGES).
    torch is not imported for this: an error raised by torch means it is loaded already."""
    if isinstance(e, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(e, oom):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(m in text for m in OOM_MESSAGES)
