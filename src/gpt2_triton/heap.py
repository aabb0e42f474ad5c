"""Give memory the process no longer uses back to the operating system (glibc, Linux).

``release_free_heap``: the C heap's free chunks.

A burst of requests leaves the ``gpt2`` process with its high-water mark: ONNX Runtime's
activations, the logits and the responses of 16 streams come and go through glibc's
malloc arenas, which keep freed chunks below the mmap threshold for reuse. Measured on the
GPT-2 small architecture: the process held ~245 MB more after 16 streams of 64 tokens had
ended; ``malloc_trim(0)`` once the loop had gone idle brought that to ~7 MB. Trimming
when the engine empties is too early (the step's last arrays and the responses still
queued are alive then), and lowering the mmap threshold instead (1 MB) returned as much
but made every step ~40% slower (page faults on fresh mappings).
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

_libc = None  # the C library, loaded on first use; False where it cannot be


def _c_library():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to give back
            _libc = False
    return _libc


def release_free_heap() -> None:
    """``malloc_trim(0)`` on glibc; nothing elsewhere. Costs a few milliseconds: call it
    when idle, never per step."""
    libc = _c_library()
    if libc:
        libc.malloc_trim(0)


_MADV_DONTNEED = 4  # Linux


def forget_pages(array: np.ndarray) -> None:
    """Zero ``array`` (a C-contiguous slice of anonymous memory) and let the OS reclaim the
    whole pages inside it: ``madvise(MADV_DONTNEED)`` on those (they read as zeros
    afterwards), a plain write of zeros on the partial pages at its edges (shared with what
    lies beside it). The in-place KV cache calls it on a vacated row (engines/slots.py):
    without it, every row a sequence ever used would stay resident until the engine
    empties, so memory would creep towards max_sequences x window under steady load."""
    libc = _c_library()
    page = mmap.PAGESIZE
    begin = array.ctypes.data
    start = -(-begin // page) * page  # whole pages only: the edges may be shared
    end = (begin + array.nbytes) // page * page
    if not libc or end <= start:
        array.fill(0)
        return
    if libc.madvise(start, end - start, _MADV_DONTNEED) != 0:  # refused: zeros by hand
        array.fill(0)
        return
    ctypes.memset(begin, 0, start - begin)
    ctypes.memset(end, 0, begin + array.nbytes - end)
