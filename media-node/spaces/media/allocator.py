"""Giving freed memory back to the operating system.

A media node allocates and frees a lot of native memory per session (OpenSSL for DTLS, libsrtp,
aiortc's buffers). glibc's malloc keeps what a closed session freed for later instead of
returning it, so the process's RSS stays at its high-water mark and creeps up with the
fragmentation of many sessions' worth of churn, although nothing is live (docs/soak.md measures
it). ``malloc_trim(0)`` returns the free pages; the node calls it a while after sessions end,
in a thread (ctypes releases the GIL), so the event loop does not wait for it.

Before each trim the node runs a full garbage collection. A closed session leaves reference
cycles behind (aiortc's peer connections and their receivers' estimators, for one), and each
holds native memory until the cyclic collector runs. Python runs a full collection only once
a quarter as many objects as the process keeps have survived since the last one. In a node
holding tens of thousands of long-lived objects, that can be many minutes after a burst of
sessions ended. Until then, that memory is neither reusable nor trimmable. The churn soak's
media node, measured at the same quiet moment, ended from 0% to 19% above its start depending
only on when the last full collection had run (docs/soak.md). A full collection of such a node
takes about 12 ms (55,000 objects, measured on a busy 2-vCPU machine), and it comes at most once
an interval.

Elsewhere than on glibc (musl, macOS) there is nothing to call and the trimmer does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


MALLOC_TRIM = _malloc_trim()


def available() -> bool:
    return MALLOC_TRIM is not None


def trim() -> bool:
    """Return free heap memory to the OS now; True if some was returned."""
    if MALLOC_TRIM is None:
        return False
    return bool(MALLOC_TRIM(0))


class Trimmer:
    """Collects garbage and trims every ``interval_s`` after something was freed in bulk (a
    session ended), twice: a closed session's last objects are freed a little later (its peer
    connections' callbacks). An idle or steady node does neither."""

    def __init__(self, interval_s: float, on_trim: Callable[[float], None] | None = None) -> None:
        self.interval_s = interval_s
        self._on_trim = on_trim
        self._pending = 0
        self.trims = 0

    def freed(self) -> None:
        """Something big was freed (a session closed)."""
        self._pending = 2

    async def forever(self) -> None:
        if self.interval_s <= 0 or not available():
            return
        while True:
            await asyncio.sleep(self.interval_s)
            if not self._pending:
                continue
            self._pending -= 1
            started = time.perf_counter()
            collected = gc.collect()  # the closed sessions' cycles, with their native memory
            released = await asyncio.to_thread(trim)
            took = time.perf_counter() - started
            self.trims += 1
            if self._on_trim is not None:
                self._on_trim(took)
            logger.debug(
                "gc and malloc_trim: %d objects collected, memory %s, in %.1f ms",
                collected,
                "released" if released else "none released",
                took * 1e3,
            )
