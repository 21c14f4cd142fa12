"""spaces.media.allocator: freed heap memory really goes back to the OS, and the node's trimmer
trims only after something was freed."""

from __future__ import annotations

import asyncio
import ctypes
import re
from pathlib import Path

from spaces.media import allocator


def rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def test_malloc_trim_returns_freed_memory() -> None:
    assert allocator.available(), "glibc's malloc_trim (Debian's Python links glibc)"
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    # 80 MB in 1 KB blocks (below the mmap threshold: from the heap), touched; then all freed
    # but the last, which pins the top of the heap, so free() cannot shrink it.
    blocks = []
    for _ in range(80_000):
        block = libc.malloc(1024)
        libc.memset(block, 1, 1024)
        blocks.append(block)
    for block in blocks[:-1]:
        libc.free(block)
    retained = rss_mb()
    assert allocator.trim()
    trimmed = rss_mb()
    libc.free(blocks[-1])
    # Most of the 80 MB was still resident after free() and went back with the trim.
    assert retained - trimmed > 50, (retained, trimmed)


async def test_trimmer_trims_twice_after_something_was_freed() -> None:
    took: list[float] = []
    trimmer = allocator.Trimmer(0.02, took.append)
    task = asyncio.create_task(trimmer.forever())
    try:
        await asyncio.sleep(0.15)
        assert trimmer.trims == 0  # nothing freed: no trim
        trimmer.freed()
        await asyncio.sleep(0.2)
        assert trimmer.trims == 2 and len(took) == 2 and all(t >= 0 for t in took)
        trimmer.freed()
        await asyncio.sleep(0.2)
        assert trimmer.trims == 4
    finally:
        task.cancel()


async def test_a_zero_interval_never_trims() -> None:
    trimmer = allocator.Trimmer(0)
    trimmer.freed()
    await asyncio.wait_for(trimmer.forever(), 1)  # returns at once
    assert trimmer.trims == 0
