"""Active-speaker detection from the RTP audio-level header extension (RFC 6464), no decoding.

Each audio packet carries the sender's level in -dBov (0 loudest, 127 silence). Levels are
converted to linear amplitude and smoothed per participant; whoever stays above a threshold is
speaking. The room asks for the ranking every interval and announces it when it changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

SILENCE_DBOV = 127
SPEAKING_THRESHOLD = 0.02
"""Linear amplitude (about -34 dBov) above which a smoothed level counts as speech."""
SMOOTHING = 0.25
"""Weight of a new observation in the exponential moving average."""
HOLD_S = 0.6
"""A speaker stays active this long after the last loud packet (covers pauses between words)."""


def dbov_to_linear(dbov: int) -> float:
    if dbov >= SILENCE_DBOV:
        return 0.0
    return float(10 ** (-dbov / 20.0))


@dataclass
class _Level:
    smoothed: float = 0.0
    last_loud: float = 0.0
    last_seen: float = field(default_factory=time.monotonic)


class SpeakerDetector:
    def __init__(self, threshold: float = SPEAKING_THRESHOLD) -> None:
        self._threshold = threshold
        self._levels: dict[str, _Level] = {}
        self.last_spoke: dict[str, float] = {}
        """participant_id -> when they last counted as speaking (for subscription ranking)."""

    def observe(self, participant_id: str, dbov: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        level = self._levels.get(participant_id)
        if level is None:
            level = self._levels[participant_id] = _Level()
        level.smoothed += SMOOTHING * (dbov_to_linear(dbov) - level.smoothed)
        level.last_seen = now
        if level.smoothed >= self._threshold:
            level.last_loud = now
            self.last_spoke[participant_id] = now

    def forget(self, participant_id: str) -> None:
        self._levels.pop(participant_id, None)
        self.last_spoke.pop(participant_id, None)

    def speakers(self, now: float | None = None) -> list[tuple[str, float]]:
        """Active speakers, loudest first, with their smoothed level (0..1)."""
        now = time.monotonic() if now is None else now
        active = [
            (pid, min(1.0, level.smoothed))
            for pid, level in self._levels.items()
            if now - level.last_loud <= HOLD_S and now - level.last_seen <= HOLD_S
        ]
        active.sort(key=lambda item: -item[1])
        return active
