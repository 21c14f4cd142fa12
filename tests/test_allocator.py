"""spaces.media.allocator: freed heap memory really goes back to the OS, and the node's trimmer
trims only after something was freed."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import re
import weakref
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
    trimmed = asyncio.Event()

    def on_trim(seconds: float) -> None:
        took.append(seconds)
        trimmed.set()

    trimmer = allocator.Trimmer(0.02, on_trim)

    async def settled() -> int:
        """The trims so far, once none came for a good while: ten intervals, or five times the
        longest trim (each includes a full garbage collection of this test process, which in
        a long test run on a busy machine takes a good part of a second)."""
        while True:
            trimmed.clear()
            quiet = max(10 * trimmer.interval_s, 5 * max(took, default=0.0), 0.5)
            try:
                await asyncio.wait_for(trimmed.wait(), quiet)
            except TimeoutError:
                return trimmer.trims

    task = asyncio.create_task(trimmer.forever())
    try:
        assert await settled() == 0  # nothing freed: no trim
        trimmer.freed()
        assert await settled() == 2
        assert len(took) == 2 and all(t >= 0 for t in took)
        trimmer.freed()
        assert await settled() == 4
    finally:
        task.cancel()


async def test_the_trimmer_collects_the_cycles_closed_sessions_left_before_trimming() -> None:
    """A closed session's reference cycles hold native memory until the cyclic collector runs,
    which a process with many long-lived objects runs rarely: the trimmer collects them first."""

    class Leftover:
        pass

    gc.collect()
    gc.disable()
    try:
        leftover = Leftover()
        leftover.cycle = leftover  # type: ignore[attr-defined]
        alive = weakref.ref(leftover)
        del leftover
        assert alive() is not None  # only the cyclic collector frees it
        trimmed = asyncio.Event()
        trimmer = allocator.Trimmer(0.02, lambda _took: trimmed.set())
        task = asyncio.create_task(trimmer.forever())
        try:
            trimmer.freed()
            await asyncio.wait_for(trimmed.wait(), 5)
            assert alive() is None
        finally:
            task.cancel()
    finally:
        gc.enable()


async def test_a_zero_interval_never_trims() -> None:
    trimmer = allocator.Trimmer(0)
    trimmer.freed()
    await asyncio.wait_for(trimmer.forever(), 1)  # returns at once
    assert trimmer.trims == 0
