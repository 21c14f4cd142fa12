"""Composing one output: video frames in a layout, and the mix of every participant's audio.

Both run on the composer's own clock, never on the sources' timestamps: video frame ``n`` is
the scene at ``t0 + n / fps`` and audio sample ``k`` the mix at ``t0 + k / 48000``, so a
participant joining, leaving or stalling changes what is drawn but never the output's
timestamps. Sources are placed on that clock by when they are due (``SourceClock``): a frame's
own media timestamp plus the least transit time its track has shown lately, i.e. when it
would have arrived with no jitter. Audio plays ``AUDIO_DELAY_S`` after it is due and video is
drawn ``VIDEO_DELAY_S`` after, so both keep a fixed latency behind capture however bursty
their arrival (a busy event loop, a stalled decoder), which keeps them in sync: what arrives
later than that is dropped (audio) or shown late (video), and never shifts the other.

Frames are composed in YUV 4:2:0 with numpy, each tile scaled by libswscale (PyAV's
``reformat``), so nothing is converted to RGB per frame.
"""

from __future__ import annotations

import io
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np

from spaces.broadcast import layouts
from spaces.broadcast.layouts import Rect, Subject, Tile

SAMPLE_RATE = 48_000
AUDIO_FRAME = 1024
"""Samples per AAC frame."""
AUDIO_DELAY_S = 0.1
"""Audio plays this long after it is due: its jitter allowance (audio arriving later than
that is dropped, and the track plays on in step)."""
AUDIO_SLIP_S = 0.02
"""A track's audio plays continuously while it is within this of its due time; beyond it, the
mixer skips (late audio) or waits with silence (early audio) to get back in step."""
AUDIO_MAX_S = 1.0
"""At most this much of a track's audio is queued (the compose thread stalled): the oldest goes."""
AUDIO_PATH_S = 0.08
"""How much longer audio's least transit time is than video's: aiortc's audio jitter buffer
holds 4 packets (80 ms) before it decodes, while a video frame is decoded once complete."""
VIDEO_DELAY_S = AUDIO_DELAY_S + AUDIO_PATH_S
"""Video is drawn this long after it is due, so that it shows with the audio captured at the
same instant (measured end to end by
tests/test_broadcast.py::test_audio_and_video_stay_in_sync)."""
CLOCK_WINDOW_S = 3.0
"""A track's transit time is the least seen over this long (it follows a sender whose clock
drifts, or whose timestamps fell behind in a stall)."""
CLOCK_RESET_S = 1.0
"""A frame this much later than its track's least transit time is a new timeline (a new source
on the receiver, a sender restarted): the track's clock starts again."""
CLOCK_STEP_S = AUDIO_DELAY_S
CLOCK_STEP_HOLD_S = 0.3
"""Every frame for this long at least ``CLOCK_STEP_S`` later than the least transit time: the
sender's timestamps stepped back (a sender that paces on the wall clock but counts frames loses
the time it stalled for), so the track's clock starts again rather than treat its audio as too
late to play until the old least transit time leaves the window."""
VIDEO_HISTORY = 10
NAME_TILE_RGB = (0x4A, 0x4A, 0x4A)


def _planes(frame: av.VideoFrame) -> list[np.ndarray[Any, Any]]:
    """Views of a yuv420p frame's Y, U, V planes (no copy)."""
    out = []
    for i, plane in enumerate(frame.planes):
        w = frame.width if i == 0 else frame.width // 2
        h = frame.height if i == 0 else frame.height // 2
        buf = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
        out.append(buf[:h, :w])
    return out


def rgb_to_yuv(image: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]:
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    return [p.copy() for p in _planes(frame.reformat(format="yuv420p"))]


class SourceClock:
    """When each frame of one track is due on the monotonic clock: its media timestamp (RTP's,
    unwrapped) plus the least transit time (arrival minus timestamp) of the track's frames over
    the last ``CLOCK_WINDOW_S``. Jitter only ever adds to a transit time, so this is when the
    frame would have arrived on the track's best path: a steady clock however frames bunch up.
    Frames without a timestamp are due when they arrive."""

    def __init__(self) -> None:
        self._last: int | None = None
        self._media = 0.0
        self._lows: deque[tuple[float, float]] = deque()
        """(arrival, transit), transits increasing: the front is the window's least."""
        self._due = -float("inf")
        self._late_since: float | None = None
        """Since when every frame came at least ``CLOCK_STEP_S`` late."""

    def due(self, frame: av.AudioFrame | av.VideoFrame, arrival: float) -> float:
        if frame.pts is None or not frame.time_base:
            return arrival
        pts = int(frame.pts)
        if self._last is None:
            self._media = 0.0
        else:
            step = (pts - self._last) % (1 << 32)  # RTP timestamps are 32 bits and wrap
            if step >= 1 << 31:
                step -= 1 << 32  # a little back in time (reordered)
            self._media += float(step * frame.time_base)
        self._last = pts
        transit = arrival - self._media
        lows = self._lows
        excess = transit - lows[0][1] if lows else 0.0
        if excess < CLOCK_STEP_S:
            self._late_since = None
        elif self._late_since is None:
            self._late_since = arrival
        if excess > CLOCK_RESET_S or (
            self._late_since is not None and arrival - self._late_since >= CLOCK_STEP_HOLD_S
        ):
            lows.clear()
            self._due = -float("inf")
            self._late_since = None
        while lows and lows[-1][1] >= transit:
            lows.pop()
        lows.append((arrival, transit))
        while lows[0][0] < arrival - CLOCK_WINDOW_S:
            lows.popleft()
        # Never earlier than the frame before (the least transit time can only drop so far).
        self._due = max(self._due, self._media + lows[0][1])
        return self._due


@dataclass
class Scene:
    """What the session sees, written by the event loop and read by the compose thread
    (attributes are replaced whole, never mutated in place)."""

    subjects: tuple[Subject, ...] = ()
    names: dict[str, str] = field(default_factory=dict)
    speaker: str = ""
    video: dict[str, deque[tuple[float, av.VideoFrame]]] = field(default_factory=dict)

    def push_video(self, key: str, due: float, frame: av.VideoFrame) -> None:
        """A frame of ``key``'s video, due at ``due`` (``SourceClock``)."""
        history = self.video.get(key)
        if history is None:
            history = self.video[key] = deque(maxlen=VIDEO_HISTORY)
        history.append((due, frame))

    def frame_at(self, key: str, at: float) -> av.VideoFrame | None:
        """The newest frame due by ``at`` (the oldest held, if none is)."""
        history = self.video.get(key)
        if not history:
            return None
        chosen = history[0][1]
        for due, frame in list(history):
            if due > at:
                break
            chosen = frame
        return chosen


class Compositor:
    def __init__(self, layout: str, width: int, height: int, background: bytes = b"") -> None:
        self.layout = layout
        self.width = width
        self.height = height
        self._base = self._background(background)
        self._transition = layouts.Transition()
        self._scaled: dict[str, tuple[int, int, int, list[np.ndarray[Any, Any]]]] = {}
        self._name_tiles: dict[tuple[str, int, int], list[np.ndarray[Any, Any]]] = {}

    def _background(self, image: bytes) -> np.ndarray[Any, Any]:
        rgb = np.empty((self.height, self.width, 3), np.uint8)
        rgb[:, :] = layouts.BACKGROUND_RGB
        if image:
            from PIL import Image

            with Image.open(io.BytesIO(image)) as picture:
                pixels = np.asarray(picture.convert("RGB"))
            h, w = min(pixels.shape[0], self.height), min(pixels.shape[1], self.width)
            rgb[:h, :w] = pixels[:h, :w]  # top-left, not repeated
        y, u, v = rgb_to_yuv(rgb)
        base = np.empty((self.height * 3 // 2, self.width), np.uint8)
        self._views(base)[0][:] = y
        self._views(base)[1][:] = u
        self._views(base)[2][:] = v
        return base

    def _views(self, buf: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]]:
        """Y, U, V of a (height * 3/2, width) buffer laid out as PyAV's yuv420p ndarray."""
        w, h = self.width, self.height
        q = h * w // 4
        flat = buf.reshape(-1)
        return [
            flat[: h * w].reshape(h, w),
            flat[h * w : h * w + q].reshape(h // 2, w // 2),
            flat[h * w + q :].reshape(h // 2, w // 2),
        ]

    def tiles(self, scene: Scene, now: float) -> list[Tile]:
        tiles = layouts.layout(self.layout, scene.subjects, self.width, self.height, scene.speaker)
        return self._transition.update(tiles, now)

    def render(self, scene: Scene, now: float, at: float) -> np.ndarray[Any, Any]:
        """The frame for wall time ``now``, drawing the video frames that arrived by ``at``: a
        new yuv420p image (PyAV's ndarray layout), never written to again."""
        buf = self._base.copy()
        canvas = self._views(buf)
        has_video = {s.key: s.has_video for s in scene.subjects}
        for tile in self.tiles(scene, now):
            frame = scene.frame_at(tile.key, at) if has_video.get(tile.key) else None
            if frame is not None:
                self._paste(canvas, tile, frame)
            else:
                self._paste_planes(canvas, tile.rect, self._name_tile(scene, tile))
        return buf

    def _paste(self, canvas: list[np.ndarray[Any, Any]], tile: Tile, frame: av.VideoFrame) -> None:
        r = tile.rect
        if r.w < 2 or r.h < 2 or frame.width < 2 or frame.height < 2:
            return
        fx, fy = r.w / frame.width, r.h / frame.height
        scale = max(fx, fy) if tile.fit == "cover" else min(fx, fy)
        sw = max(2, min(r.w if tile.fit == "contain" else 8192, int(frame.width * scale + 1.5)))
        sh = max(2, min(r.h if tile.fit == "contain" else 8192, int(frame.height * scale + 1.5)))
        sw, sh = sw // 2 * 2, sh // 2 * 2
        if tile.fit == "cover":
            sw, sh = max(sw, r.w), max(sh, r.h)
        cached = self._scaled.get(tile.key)
        if cached is not None and cached[:3] == (id(frame), sw, sh):
            planes = cached[3]
        else:
            planes = _planes(frame.reformat(width=sw, height=sh, format="yuv420p"))
            self._scaled[tile.key] = (id(frame), sw, sh, planes)
        if tile.fit == "cover":
            ox, oy = (sw - r.w) // 4 * 2, (sh - r.h) // 4 * 2
            self._paste_planes(canvas, r, planes, ox, oy)
        else:
            dx, dy = (r.w - sw) // 4 * 2, (r.h - sh) // 4 * 2
            self._paste_planes(canvas, Rect(r.x + dx, r.y + dy, sw, sh), planes)

    def _paste_planes(
        self,
        canvas: list[np.ndarray[Any, Any]],
        r: Rect,
        planes: Sequence[np.ndarray[Any, Any]],
        ox: int = 0,
        oy: int = 0,
    ) -> None:
        w = min(r.w, self.width - r.x)
        h = min(r.h, self.height - r.y)
        if w <= 0 or h <= 0:
            return
        canvas[0][r.y : r.y + h, r.x : r.x + w] = planes[0][oy : oy + h, ox : ox + w]
        x2, y2, w2, h2, ox2, oy2 = r.x // 2, r.y // 2, w // 2, h // 2, ox // 2, oy // 2
        for i in (1, 2):
            canvas[i][y2 : y2 + h2, x2 : x2 + w2] = planes[i][oy2 : oy2 + h2, ox2 : ox2 + w2]

    def _name_tile(self, scene: Scene, tile: Tile) -> list[np.ndarray[Any, Any]]:
        """A participant without video: its name on a grey tile."""
        name = scene.names.get(tile.key, tile.key.split("/")[0])
        key = (name, tile.rect.w, tile.rect.h)
        planes = self._name_tiles.get(key)
        if planes is None:
            planes = rgb_to_yuv(name_image(name, tile.rect.w, tile.rect.h))
            if len(self._name_tiles) > 64:
                self._name_tiles.clear()
            self._name_tiles[key] = planes
        return planes

    def forget(self, keys: set[str]) -> None:
        for key in [k for k in self._scaled if k not in keys]:
            del self._scaled[key]


def name_image(name: str, width: int, height: int) -> np.ndarray[Any, Any]:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (max(width, 2), max(height, 2)), NAME_TILE_RGB)
    if name:
        draw = ImageDraw.Draw(image)
        size = max(10, min(height // 6, width // max(4, len(name)) * 2))
        font = ImageFont.load_default(size=size)
        box = draw.textbbox((0, 0), name, font=font)
        x = (width - (box[2] - box[0])) // 2 - box[0]
        y = (height - (box[3] - box[1])) // 2 - box[1]
        draw.text((x, y), name, fill=(235, 235, 235), font=font)
    return np.asarray(image)


# --- audio -------------------------------------------------------------------------------------


class _TrackAudio:
    """One track's samples (stereo s16 at 48 kHz), queued with when each chunk is due."""

    def __init__(self) -> None:
        self.chunks: deque[tuple[float, np.ndarray[Any, Any]]] = deque()
        """(when the chunk's first sample is due, its samples)"""
        self.queued = 0
        self.resampler = av.AudioResampler(format="s16", layout="stereo", rate=SAMPLE_RATE)

    def push(self, frame: av.AudioFrame, due: float) -> None:
        for out in self.resampler.resample(frame):
            samples = out.to_ndarray().reshape(-1, 2)  # packed s16: (1, n * 2)
            self.chunks.append((due, samples))
            self.queued += samples.shape[0]
            due += samples.shape[0] / SAMPLE_RATE
        while self.queued > AUDIO_MAX_S * SAMPLE_RATE:
            self.queued -= self.chunks.popleft()[1].shape[0]

    def pull(self, n: int, at: float) -> np.ndarray[Any, Any] | None:
        """``n`` samples, the first of which plays at ``at``: the audio due ``AUDIO_DELAY_S``
        before, played continuously while it stays within ``AUDIO_SLIP_S`` of that."""
        if not self.chunks:
            return None
        out = np.zeros((n, 2), np.int16)
        start = at - AUDIO_DELAY_S  # the due time out[0] wants
        filled = 0
        while filled < n and self.chunks:
            due, chunk = self.chunks[0]
            late = round((start + filled / SAMPLE_RATE - due) * SAMPLE_RATE)
            if late < -AUDIO_SLIP_S * SAMPLE_RATE:
                filled += -late  # not due yet: silence until it is
                continue
            skip = late if late > AUDIO_SLIP_S * SAMPLE_RATE else 0  # too late: drop
            take = 0 if skip >= chunk.shape[0] else min(n - filled, chunk.shape[0] - skip)
            out[filled : filled + take] = chunk[skip : skip + take]
            filled += take
            used = skip + take
            self.queued -= min(used, chunk.shape[0])
            if used >= chunk.shape[0]:
                self.chunks.popleft()
            else:
                self.chunks[0] = (due + used / SAMPLE_RATE, chunk[used:])
        return out


class Mixer:
    """The sum of every track's audio, one AAC frame at a time. Thread-safe: tracks are fed
    by the event loop and pulled by the compose thread."""

    def __init__(self) -> None:
        self._tracks: dict[str, _TrackAudio] = {}
        self._lock = threading.Lock()

    def push(self, key: str, frame: av.AudioFrame, due: float) -> None:
        with self._lock:
            track = self._tracks.get(key)
            if track is None:
                track = self._tracks[key] = _TrackAudio()
            track.push(frame, due)

    def remove(self, key: str) -> None:
        with self._lock:
            self._tracks.pop(key, None)

    def pull(self, at: float, n: int = AUDIO_FRAME) -> np.ndarray[Any, Any]:
        """The mix of ``n`` samples, the first of which plays at monotonic time ``at``."""
        total = np.zeros((n, 2), np.int32)
        with self._lock:
            for track in self._tracks.values():
                samples = track.pull(n, at)
                if samples is not None:
                    total += samples
        return np.clip(total, -32768, 32767).astype(np.int16)


def audio_frame(samples: np.ndarray[Any, Any], pts: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="stereo")
    frame.sample_rate = SAMPLE_RATE
    frame.pts = pts
    return frame
