"""spaces.broadcast.compose.SourceClock: when a source's frames are due on the composer's clock
(the end-to-end sync is tests/test_broadcast.py::test_audio_and_video_stay_in_sync)."""

from __future__ import annotations

import itertools
from fractions import Fraction

import av

from spaces.broadcast.compose import CLOCK_RESET_S, SourceClock

RATE = 90_000
FPS = 30


def frame(pts: int) -> av.VideoFrame:
    f = av.VideoFrame(16, 16, "yuv420p")
    f.pts = pts
    f.time_base = Fraction(1, RATE)
    return f


def test_jittered_arrivals_are_due_on_a_steady_clock() -> None:
    clock = SourceClock()
    jitter = [0.0, 0.04, 0.01, 0.09, 0.0, 0.03, 0.07, 0.02] * 4
    dues = [
        clock.due(frame(n * RATE // FPS), 100.0 + n / FPS + extra) for n, extra in enumerate(jitter)
    ]
    # Every frame is due at its timestamp on the best path seen: exactly 1/30 s apart however
    # late each one arrived.
    steps = [b - a for a, b in itertools.pairwise(dues)]
    assert all(abs(s - 1 / FPS) < 1e-6 for s in steps), steps
    assert abs(dues[0] - 100.0) < 1e-6


def test_rtp_timestamps_wrapping_at_32_bits_keep_the_clock_going() -> None:
    clock = SourceClock()
    start = (1 << 32) - 2 * (RATE // FPS)
    dues = [
        clock.due(frame((start + n * RATE // FPS) % (1 << 32)), 50.0 + n / FPS) for n in range(6)
    ]
    steps = [b - a for a, b in itertools.pairwise(dues)]
    assert all(abs(s - 1 / FPS) < 1e-6 for s in steps), steps


def test_a_new_timeline_restarts_the_clock() -> None:
    clock = SourceClock()
    for n in range(10):
        clock.due(frame(n * RATE // FPS), 10.0 + n / FPS)
    # The sender restarted: its timestamps begin again, so every frame now looks far later than
    # the track's best path. The clock starts again instead of holding it there.
    later = 10.0 + 10 / FPS + CLOCK_RESET_S + 1.0
    due = clock.due(frame(0), later)
    assert abs(due - later) < 1e-6
    assert abs(clock.due(frame(RATE // FPS), later + 1 / FPS) - (later + 1 / FPS)) < 1e-6
