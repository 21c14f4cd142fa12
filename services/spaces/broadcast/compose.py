"""Composing one output: video frames in a layout, and the mix of every participant's audio.

Both run on the composer's own clock, never on the sources' timestamps: video frame ``n`` is
the scene at ``t0 + n / fps`` and audio sample ``k`` the mix at ``t0 + k / 48000``, so a
participant joining, leaving or stalling changes what is drawn but never the output's
timestamps. Sources are sampled by their arrival time: the mixer holds each track's audio for
``AUDIO_BUFFER_S`` to absorb jitter, and video is drawn ``VIDEO_DELAY_S`` behind arrival to
match, which keeps audio and video in sync.

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
AUDIO_BUFFER_S = 0.06
"""Jitter buffer of each audio track: playback starts once this much is queued."""
AUDIO_MAX_S = 0.25
"""A track queued beyond this (its clock runs fast, or a burst) is trimmed back to the buffer."""
VIDEO_DELAY_S = 0.12
"""Video is drawn this far behind its arrival: aiortc's audio jitter buffer (about 80 ms) plus
the mixer's own buffer, minus the video path's decode latency (measured; see
tests/test_broadcast.py::test_audio_and_video_stay_in_sync)."""
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


@dataclass
class Scene:
    """What the session sees, written by the event loop and read by the compose thread
    (attributes are replaced whole, never mutated in place)."""

    subjects: tuple[Subject, ...] = ()
    names: dict[str, str] = field(default_factory=dict)
    speaker: str = ""
    video: dict[str, deque[tuple[float, av.VideoFrame]]] = field(default_factory=dict)

    def push_video(self, key: str, arrival: float, frame: av.VideoFrame) -> None:
        history = self.video.get(key)
        if history is None:
            history = self.video[key] = deque(maxlen=VIDEO_HISTORY)
        history.append((arrival, frame))

    def frame_at(self, key: str, at: float) -> av.VideoFrame | None:
        history = self.video.get(key)
        if not history:
            return None
        chosen = history[0][1]
        for arrival, frame in list(history):
            if arrival > at:
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
    """One track's samples (stereo s16 at 48 kHz), queued by arrival."""

    def __init__(self) -> None:
        self.chunks: deque[np.ndarray[Any, Any]] = deque()
        self.queued = 0
        self.playing = False
        self.resampler = av.AudioResampler(format="s16", layout="stereo", rate=SAMPLE_RATE)

    def push(self, frame: av.AudioFrame) -> None:
        for out in self.resampler.resample(frame):
            samples = out.to_ndarray().reshape(-1, 2)  # packed s16: (1, n * 2)
            self.chunks.append(samples)
            self.queued += samples.shape[0]
        if self.queued > AUDIO_MAX_S * SAMPLE_RATE:
            self._trim(int(AUDIO_BUFFER_S * SAMPLE_RATE))

    def _trim(self, keep: int) -> None:
        while self.queued - self.chunks[0].shape[0] >= keep:
            self.queued -= self.chunks.popleft().shape[0]

    def pull(self, n: int) -> np.ndarray[Any, Any] | None:
        if not self.playing:
            if self.queued < AUDIO_BUFFER_S * SAMPLE_RATE:
                return None
            self.playing = True
        if self.queued < n:
            self.playing = False  # ran dry: buffer again before playing on
        out = np.zeros((n, 2), np.int16)
        filled = 0
        while filled < n and self.chunks:
            chunk = self.chunks[0]
            take = min(n - filled, chunk.shape[0])
            out[filled : filled + take] = chunk[:take]
            filled += take
            if take == chunk.shape[0]:
                self.chunks.popleft()
            else:
                self.chunks[0] = chunk[take:]
        self.queued -= filled
        return out


class Mixer:
    """The sum of every track's audio, one AAC frame at a time. Thread-safe: tracks are fed
    by the event loop and pulled by the compose thread."""

    def __init__(self) -> None:
        self._tracks: dict[str, _TrackAudio] = {}
        self._lock = threading.Lock()

    def push(self, key: str, frame: av.AudioFrame) -> None:
        with self._lock:
            track = self._tracks.get(key)
            if track is None:
                track = self._tracks[key] = _TrackAudio()
            track.push(frame)

    def remove(self, key: str) -> None:
        with self._lock:
            self._tracks.pop(key, None)

    def pull(self, n: int = AUDIO_FRAME) -> np.ndarray[Any, Any]:
        total = np.zeros((n, 2), np.int32)
        with self._lock:
            for track in self._tracks.values():
                samples = track.pull(n)
                if samples is not None:
                    total += samples
        return np.clip(total, -32768, 32767).astype(np.int16)


def audio_frame(samples: np.ndarray[Any, Any], pts: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="stereo")
    frame.sample_rate = SAMPLE_RATE
    frame.pts = pts
    return frame
