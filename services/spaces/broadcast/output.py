"""The composer's output: a clock-driven compose thread, and RTMP attempts with backoff.

PyAV's RTMP write blocks with no timeout when the server stops reading (neither ``timeout``
nor ``rw_timeout`` bound a write), so the encoder and muxer run in a thread of their own, fed
through a bounded queue, and a watchdog notices when a connect or a write makes no progress for
``rtmp_timeout``. A blocked thread cannot be stopped, so the composer process then exits; its
worker starts it again with backoff (the process is the unit a watchdog can kill). A server that
refuses or drops the connection is retried in place, with backoff, and the compose clock keeps
running, so the next connection starts at a clean timestamp 0.
"""

from __future__ import annotations

import contextlib
import fractions
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import av
import numpy as np

from spaces.broadcast.compose import (
    AUDIO_FRAME,
    SAMPLE_RATE,
    VIDEO_DELAY_S,
    Compositor,
    Mixer,
    Scene,
    audio_frame,
)

logger = logging.getLogger(__name__)

FPS = 30
QUEUE_FRAMES = 150
"""Video frames waiting for the encoder (5 s): enough to ride out the seconds a busy machine
can stall this process for (a renegotiation on a join, measured at load 16 on 2 cores);
beyond it, video frames are dropped (a gap). Most waiting frames are repeats, which share the
picture they repeat."""
BACKLOG_FRAMES = 10
"""With more video frames than this waiting for the encoder, the compose thread repeats the
last frame instead of composing (a repeat costs no CPU and no memory until it is encoded)."""
BACKLOG_FRESH_EVERY = 3
"""While the encoder is behind, one slot in this many is still composed anew (10 fps)."""


def default_kbps(width: int, height: int) -> int:
    pixels = width * height
    if pixels >= 1920 * 1080 * 0.9:
        return 4500
    if pixels >= 1280 * 720 * 0.9:
        return 2500
    return 1500


@dataclass
class OutputSettings:
    url: str
    width: int
    height: int
    encoder: str = "libx264"
    encoder_options: dict[str, str] = field(default_factory=lambda: {"preset": "veryfast"})
    video_kbps: int = 0
    audio_kbps: int = 128
    rtmp_timeout_s: float = 5.0
    retry_initial_s: float = 1.0
    retry_max_s: float = 30.0


@dataclass
class Stats:
    frames_composed: int = 0
    frames_dropped: int = 0
    frames_lost: int = 0
    """Of the dropped: frames a full encoder queue turned away (each leaves a gap)."""
    encoder_errors: int = 0
    rtmp_errors: int = 0
    connects: int = 0
    streaming: bool = False
    last_error: str = ""
    progress_at: float = field(default_factory=time.monotonic)
    """When the output last made progress (a connect, a write) or last began an attempt."""
    busy: bool = False
    """True while a connect or write is in flight (what the stall watchdog watches)."""


class Stalled(Exception):
    pass


class Pipeline:
    """Compose at FPS on the wall clock; encode and push to RTMP, reconnecting with backoff."""

    def __init__(
        self,
        settings: OutputSettings,
        compositor: Compositor,
        scene: Scene,
        mixer: Mixer,
        on_stall: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.compositor = compositor
        self.scene = scene
        self.mixer = mixer
        self.stats = Stats()
        self._on_stall = on_stall
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue(maxsize=QUEUE_FRAMES * 3)
        self._stop = threading.Event()
        self._attempt_ok = threading.Event()
        self._threads: list[threading.Thread] = []
        self._video_in = 0
        """Video frames queued (counted by the compose thread only)."""
        self._video_out = 0
        """Video frames taken from the queue (counted by the output thread only)."""

    def start(self) -> None:
        for target, name in (
            (self._compose_loop, "compose"),
            (self._output_loop, "rtmp-output"),
            (self._watchdog, "rtmp-watchdog"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        for thread in self._threads:
            thread.join(timeout)

    # --- composing ----------------------------------------------------------------------

    def _compose_loop(self) -> None:
        """Video frame n is the scene at t0 + n/FPS; audio keeps pace sample for sample.

        Every slot of the timeline gets a frame, so the output stays at FPS with no gap in its
        timestamps however busy the machine is: a tick that comes late first repeats the last
        frame for the slots it missed, and while the encoder is behind (more than
        ``BACKLOG_FRAMES`` waiting) only one slot in ``BACKLOG_FRESH_EVERY`` is composed anew
        and the others repeat it, which leaves the CPU to the encoder while the picture still
        moves. Repeated frames are counted as dropped."""
        t0 = time.monotonic()
        n = 0
        samples = 0
        last: np.ndarray[Any, Any] | None = None
        fresh = 0  # the slot last composed anew
        while not self._stop.is_set():
            due = t0 + n / FPS
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
                now = time.monotonic()
            behind = int((now - due) * FPS)
            if last is not None:
                for _ in range(behind):
                    self._repeat(last, n)
                    n += 1
            else:
                n += behind  # nothing to show yet: the stream starts at the first frame
            backlog = self._video_in - self._video_out > BACKLOG_FRAMES
            if last is not None and backlog and n - fresh < BACKLOG_FRESH_EVERY:
                self._repeat(last, n)
            else:
                fresh = n
                try:
                    # Slot n shows the video due VIDEO_DELAY_S before the slot's own instant
                    # (not before now, which is later when the tick is late): the frames
                    # nearest it, so within half a slot.
                    shown = t0 + (n + 0.5) / FPS - VIDEO_DELAY_S
                    last = self.compositor.render(self.scene, now, shown)
                    self.stats.frames_composed += 1
                    self._offer(("v", (last, n)))
                except Exception:
                    logger.exception("compose failed")
                    self.stats.encoder_errors += 1
                    if last is not None:
                        self._repeat(last, n)
            n += 1
            target = int((now - t0) * SAMPLE_RATE)
            while samples + AUDIO_FRAME <= target + AUDIO_FRAME:
                at = t0 + samples / SAMPLE_RATE  # when the first of these samples plays
                self._offer(("a", audio_frame(self.mixer.pull(at, AUDIO_FRAME), samples)))
                samples += AUDIO_FRAME

    def _repeat(self, image: np.ndarray[Any, Any], n: int) -> None:
        """Slot ``n`` shows the last composed image again (no copy until it is encoded)."""
        self.stats.frames_dropped += 1
        self._offer(("v", (image, n)))

    def _offer(self, item: tuple[str, Any]) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            if item[0] == "v":
                self.stats.frames_dropped += 1
                self.stats.frames_lost += 1
            return
        if item[0] == "v":
            self._video_in += 1

    # --- output -------------------------------------------------------------------------

    def _output_loop(self) -> None:
        backoff = self.settings.retry_initial_s
        while not self._stop.is_set():
            try:
                self._attempt()
            except Stalled:
                return
            except Exception as exc:
                self.stats.rtmp_errors += 1
                self.stats.last_error = f"rtmp: {_describe(exc)}"
                logger.warning("rtmp output failed: %s; retrying in %.1fs", _describe(exc), backoff)
            self.stats.streaming = False
            self.stats.busy = False
            if self._attempt_ok.is_set():
                backoff = self.settings.retry_initial_s  # it had worked: try again at once
                self._attempt_ok.clear()
            delay = backoff * random.uniform(0.8, 1.2)
            backoff = min(backoff * 2, self.settings.retry_max_s)
            if self._stop.wait(delay):
                return

    def _drain_queue(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[0] == "v":
                self._video_out += 1

    def _progress(self) -> None:
        self.stats.progress_at = time.monotonic()

    def _attempt(self) -> None:
        s = self.settings
        self.stats.busy = True
        self._progress()
        container = av.open(
            s.url,
            mode="w",
            format="flv",
            options={"flvflags": "no_duration_filesize"},
            timeout=s.rtmp_timeout_s,
        )
        try:
            video = container.add_stream(s.encoder, rate=FPS)
            video.width, video.height, video.pix_fmt = s.width, s.height, "yuv420p"
            kbps = s.video_kbps or default_kbps(s.width, s.height)
            video.bit_rate = kbps * 1000
            video.codec_context.gop_size = FPS * 2  # a keyframe every 2 s, as live services ask
            video.options = {
                **s.encoder_options,
                "maxrate": f"{kbps}k",
                "bufsize": f"{kbps * 2}k",
            }
            video.time_base = fractions.Fraction(1, FPS)
            audio = container.add_stream("aac", rate=SAMPLE_RATE, layout="stereo")
            audio.bit_rate = s.audio_kbps * 1000
            self.stats.connects += 1
            # What was composed while connecting is stale: the stream starts with what comes
            # next (or it would run that much behind for good on a machine with no CPU spare).
            self._drain_queue()
            first_video: int | None = None
            self.stats.busy = False
            self._progress()
            while not self._stop.is_set():
                try:
                    item = self._queue.get(timeout=0.5)
                except queue.Empty:
                    continue
                if item is None:
                    break
                kind, payload = item
                # Each connection starts at 0: rebase the composer's clock to it.
                if kind == "v":
                    self._video_out += 1
                    image, n = payload
                    first_video = n if first_video is None else first_video
                    frame = _video_frame(image, n - first_video)
                    try:
                        packets = video.encode(frame)
                    except av.error.FFmpegError:
                        self.stats.encoder_errors += 1
                        raise
                else:
                    frame = payload
                    if first_video is None:
                        continue  # audio starts with the first video frame
                    # The same origin as the video (its first frame's instant, in samples),
                    # or the two would start up to a frame apart.
                    first_audio = first_video * SAMPLE_RATE // FPS
                    if frame.pts < first_audio:
                        continue
                    frame.pts -= first_audio
                    packets = audio.encode(frame)
                for packet in packets:
                    self.stats.busy = True
                    self._progress()
                    container.mux(packet)
                    self.stats.busy = False
                    self._progress()
                if kind == "v" and first_video is not None:
                    self.stats.streaming = True
                    self.stats.last_error = ""
                    self._attempt_ok.set()
        finally:
            self.stats.streaming = False
            if self._stop.is_set() and not self.stats.busy:
                with contextlib.suppress(Exception):
                    for stream in container.streams:
                        for packet in stream.encode(None):
                            container.mux(packet)
            with contextlib.suppress(Exception):
                container.close()

    def _watchdog(self) -> None:
        limit = self.settings.rtmp_timeout_s
        while not self._stop.wait(0.25):
            stats = self.stats
            if stats.busy and time.monotonic() - stats.progress_at > limit:
                stats.rtmp_errors += 1
                stats.streaming = False
                stats.last_error = f"rtmp: no progress for {limit:.0f}s (server stalled)"
                logger.warning("rtmp output stalled for %.1fs", limit)
                self._on_stall(stats.last_error)
                return


def _video_frame(image: np.ndarray[Any, Any], n: int) -> av.VideoFrame:
    """An encoder frame of the image at slot ``n`` of this connection."""
    frame = av.VideoFrame.from_ndarray(image, format="yuv420p")
    frame.pts = n
    frame.time_base = fractions.Fraction(1, FPS)
    return frame


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.lower()[:200]
