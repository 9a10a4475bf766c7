"""Kernel of the allocator: glibc's malloc keeps freed memory for reuse instead of returning it to the OS.

numpy allocates every activation and temporary afresh. glibc serves large blocks with their
own mmap and hands freed memory back to the OS, so the next step's arrays fault their pages
in again (a tenth or more of a digits training step's CPU time goes to the kernel: see
BENCHMARKS.md, "Speed work, second round"). Fixing two thresholds (mallopt M_MMAP_THRESHOLD 32 MiB, glibc's
largest, and M_TRIM_THRESHOLD 1 GiB) turns malloc into a cache for those blocks, as PyTorch's
caching allocators are: the process keeps its peak in memory. Applied once, by the kernels
layer when the fast kernels are first chosen; MINIDIFF_MALLOC_TUNING=0 skips it.
May import: (the standard library only).
"""
import ctypes
import os
import sys

tuned = False  # whether keep_freed_memory() has set the thresholds in this process


def keep_freed_memory():
    """Set glibc's two malloc thresholds (Linux with glibc only); returns True when they are set."""
    global tuned
    if tuned:
        return True
    if os.environ.get("MINIDIFF_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc, not musl: mallopt's codes are glibc's)
        m_trim_threshold, m_mmap_threshold = -1, -3
        tuned = bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        tuned = False
    return tuned
