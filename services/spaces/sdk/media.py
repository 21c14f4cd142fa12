"""Synthetic media for demos, tests and load: a test pattern whose pixels say who sent it and
which frame it is, and a tone (or silence) whose level drives active-speaker detection."""

from __future__ import annotations

import asyncio
import fractions
import hashlib
import math
import time
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack

VIDEO_CLOCK_RATE = 90_000
AUDIO_RATE = 48_000
AUDIO_PTIME = 0.02
BLOCK = 40
"""Side of each frame-counter block, in pixels: large enough to survive VP8 compression."""
COUNTER_BITS = 16


def color_for(label: str) -> tuple[int, int, int]:
    """A saturated colour derived from ``label`` (e.g. a participant id)."""
    digest = hashlib.sha256(label.encode()).digest()
    hue = digest[0] / 255.0
    r, g, b = (max(0.0, min(1.0, abs(hue * 6 - k) - 1)) for k in (3, 2, 4))
    return (int(40 + 200 * (1 - r)), int(40 + 200 * g), int(40 + 200 * b))


class _Paced:
    """Frame pacing on the wall clock that skips ahead instead of bursting after a stall."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next = 0.0

    async def wait(self) -> None:
        now = time.monotonic()
        if self._next == 0.0 or now - self._next > 0.1:
            self._next = now
        delay = self._next - now
        if delay > 0:
            await asyncio.sleep(delay)
        self._next += self._interval


class TestPatternTrack(MediaStreamTrack):
    """Video: the top of each frame is one colour (the sender's), the bottom row encodes the
    frame number in 16 black/white blocks."""

    kind = "video"
    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self, color: tuple[int, int, int], width: int = 640, height: int = 480, fps: int = 30
    ) -> None:
        super().__init__()
        if width < BLOCK * COUNTER_BITS or height < BLOCK * 2:
            raise ValueError("test pattern needs at least 640x80 pixels")
        self.color = color
        self.width = width
        self.height = height
        self.fps = fps
        self._base = np.zeros((height, width, 3), dtype=np.uint8)
        self._base[:, :] = color
        # A moving gradient keeps the encoder busy like a real camera would.
        self._gradient = (np.arange(width, dtype=np.uint16) % 64).astype(np.uint8)
        self._pace = _Paced(1 / fps)
        self.frames_sent = 0

    async def recv(self) -> av.VideoFrame:
        await self._pace.wait()
        n = self.frames_sent
        self.frames_sent += 1
        image = self._base.copy()
        band = slice(self.height - 3 * BLOCK, self.height - BLOCK)
        image[band, :, :] = np.clip(
            np.roll(self._gradient, n * 4)[None, :, None].astype(np.int16) + 96, 0, 255
        ).astype(np.uint8)
        row = slice(self.height - BLOCK, self.height)
        for bit in range(COUNTER_BITS):
            value = 255 if (n >> bit) & 1 else 0
            image[row, bit * BLOCK : (bit + 1) * BLOCK] = value
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = int(n * VIDEO_CLOCK_RATE / self.fps)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)
        return frame


def read_pattern(frame: av.VideoFrame) -> tuple[tuple[int, int, int], int]:
    """(colour of the top area, frame number) of a decoded test-pattern frame."""
    image = frame.to_ndarray(format="rgb24")
    height = image.shape[0]
    top = image[: height // 2]
    color = tuple(int(c) for c in top.reshape(-1, 3).mean(axis=0))
    row = image[height - BLOCK + 8 : height - 8]
    number = 0
    for bit in range(COUNTER_BITS):
        block = row[:, bit * BLOCK + 8 : (bit + 1) * BLOCK - 8]
        if block.mean() > 127:
            number |= 1 << bit
    return (color[0], color[1], color[2]), number


def same_color(a: tuple[int, int, int], b: tuple[int, int, int], tolerance: int = 30) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


class ToneTrack(MediaStreamTrack):
    """Audio: a sine tone (``amplitude`` 0 sends digital silence), 20 ms frames, 48 kHz mono."""

    kind = "audio"

    def __init__(self, frequency: float = 440.0, amplitude: float = 0.3) -> None:
        super().__init__()
        self.frequency = frequency
        self.amplitude = amplitude
        self._samples = int(AUDIO_RATE * AUDIO_PTIME)
        self._pace = _Paced(AUDIO_PTIME)
        self._t = 0

    async def recv(self) -> av.AudioFrame:
        await self._pace.wait()
        t = (np.arange(self._samples) + self._t) / AUDIO_RATE
        wave = self.amplitude * np.sin(2 * math.pi * self.frequency * t) * 32767
        data = wave.astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(data, format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = self._t
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        self._t += self._samples
        return frame


class Flashes:
    """A schedule shared by a ``FlashTrack`` and a ``BeepTrack``: a flash of light and a beep
    that begin at the same instants, every ``period`` seconds for ``length`` seconds, on the
    monotonic clock (to measure audio/video sync end to end)."""

    def __init__(self, period: float = 1.0, length: float = 0.3) -> None:
        if not 0 < length < period:
            raise ValueError("a flash must be shorter than its period")
        self.period = period
        self.length = length
        self.start = time.monotonic()

    def on(self, at: np.ndarray[Any, Any] | float) -> np.ndarray[Any, Any]:
        """Whether the schedule flashes at each of the monotonic times ``at``."""
        return np.asarray((np.asarray(at) - self.start) % self.period < self.length)


class FlashTrack(MediaStreamTrack):
    """Video: the whole frame is ``dark``, and ``light`` while the schedule flashes."""

    kind = "video"

    def __init__(
        self,
        flashes: Flashes,
        dark: tuple[int, int, int] = (40, 40, 200),
        light: tuple[int, int, int] = (240, 240, 240),
        width: int = 640,
        height: int = 480,
        fps: int = 30,
    ) -> None:
        super().__init__()
        self.flashes = flashes
        self._images = {
            lit: np.full((height, width, 3), light if lit else dark, np.uint8)
            for lit in (False, True)
        }
        self.fps = fps
        self._pace = _Paced(1 / fps)
        self._n = 0

    async def recv(self) -> av.VideoFrame:
        await self._pace.wait()
        lit = bool(self.flashes.on(time.monotonic()))
        frame = av.VideoFrame.from_ndarray(self._images[lit], format="rgb24")
        frame.pts = int(self._n * VIDEO_CLOCK_RATE / self.fps)
        frame.time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)
        self._n += 1
        return frame


class BeepTrack(MediaStreamTrack):
    """Audio: silence, and a tone while the schedule flashes, to the sample (a frame handed
    over at time T holds the 20 ms before T, as a microphone's would)."""

    kind = "audio"

    def __init__(self, flashes: Flashes, frequency: float = 1000.0, amplitude: float = 0.5):
        super().__init__()
        self.flashes = flashes
        self.frequency = frequency
        self.amplitude = amplitude
        self._samples = int(AUDIO_RATE * AUDIO_PTIME)
        self._pace = _Paced(AUDIO_PTIME)
        self._t = 0

    async def recv(self) -> av.AudioFrame:
        await self._pace.wait()
        now = time.monotonic()
        i = np.arange(self._samples)
        on = self.flashes.on(now - (self._samples - i) / AUDIO_RATE)
        wave = self.amplitude * np.sin(2 * math.pi * self.frequency * (i + self._t) / AUDIO_RATE)
        data = (wave * on * 32767).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(data, format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = self._t
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        self._t += self._samples
        return frame
