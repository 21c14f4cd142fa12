"""A real RTMP receiver for tests: nginx with Debian's libnginx-mod-rtmp, on a free loopback
port, recording every publish to its own FLV file; and helpers that read what arrived."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RTMP_MODULE = "/usr/lib/nginx/modules/ngx_rtmp_module.so"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RtmpServer:
    """``rtmp://127.0.0.1:<port>/live/<key>``; each publish is recorded to
    ``<dir>/<key>-<unix time>.flv``. One process (master_process off), so SIGSTOP stalls it."""

    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="spaces-rtmp-"))
        self.records = self.dir / "rec"
        self.records.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, key: str = "") -> str:
        base = f"rtmp://127.0.0.1:{self.port}/live"
        return f"{base}/{key}" if key else base

    def start(self) -> RtmpServer:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.path.exists(nginx) or not os.path.exists(RTMP_MODULE):
            raise RuntimeError("nginx with libnginx-mod-rtmp is missing: run `make media-tools`")
        conf = self.dir / "nginx.conf"
        conf.write_text(
            f"""
load_module {RTMP_MODULE};
daemon off;
master_process off;
worker_processes 1;
error_log {self.dir}/error.log info;
pid {self.dir}/nginx.pid;
events {{ worker_connections 64; }}
rtmp {{
  server {{
    listen 127.0.0.1:{self.port};
    chunk_size 4096;
    application live {{
      live on;
      record all;
      record_path {self.records};
      record_unique on;
      record_suffix .flv;
    }}
  }}
}}
"""
        )
        self.proc = subprocess.Popen(
            [nginx, "-c", str(conf), "-p", str(self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.dir / 'error.log').read_text()}")
            time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def stall(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def recordings(self, key: str = "") -> list[Path]:
        """FLV files, oldest first (one per publish)."""
        return sorted(self.records.glob(f"{key}*.flv"), key=lambda p: p.stat().st_mtime)


def probe(path: Path) -> dict[str, object]:
    """ffprobe's view of a recording: its streams."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_streams", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return json.loads(out.stdout or "{}")


def decode_video(
    path: Path, limit: int = 10_000, keep: Callable[[Any], Any] | None = None
) -> list[tuple[float, Any]]:
    """(pts seconds, rgb ndarray) of the decodable video frames of a (possibly still growing)
    recording; with ``keep``, (pts, keep(rgb ndarray)) instead: a 720p picture is 2.7 MB, so
    a long recording is reduced frame by frame rather than held whole."""
    import av

    frames: list[tuple[float, Any]] = []
    with (
        contextlib.suppress(av.error.InvalidDataError, av.error.EOFError, OSError),
        av.open(str(path)) as container,
    ):
        for frame in container.decode(video=0):
            image = frame.to_ndarray(format="rgb24")
            frames.append((float(frame.time or 0.0), keep(image) if keep else image))
            if len(frames) >= limit:
                break
    return frames


def _flv_tail(data: bytes) -> bytes:
    """An FLV of a (possibly still growing) recording's header tags (metadata, the codecs'
    configurations) and its complete tags from the last video keyframe on: enough to decode
    the newest pictures without decoding the whole recording again."""
    if len(data) < 13 or data[:3] != b"FLV":
        return data
    header_end = int.from_bytes(data[5:9], "big") + 4  # the header and PreviousTagSize0
    head: list[bytes] = []
    tags: list[tuple[int, bool]] = []  # (offset, is a video keyframe)
    pos = header_end
    while pos + 11 <= len(data):
        size = int.from_bytes(data[pos + 1 : pos + 4], "big")
        end = pos + 11 + size + 4
        if end > len(data):
            break  # still being written
        kind = data[pos] & 0x1F
        body = data[pos + 11 : pos + 11 + size]
        config = kind == 18 or (kind in (8, 9) and len(body) > 1 and body[1] == 0)
        if config and not any(t for _, t in tags):
            head.append(data[pos:end])
        else:
            tags.append((pos, kind == 9 and len(body) > 1 and body[0] >> 4 == 1 and body[1] == 1))
        pos = end
    keyframes = [offset for offset, key in tags if key]
    if not keyframes:
        return data[:pos]
    return data[:header_end] + b"".join(head) + data[keyframes[-1] : pos]


def last_video_frame(path: Path) -> Any:
    """The rgb ndarray of the last decodable video frame of a recording, or None. Decodes from
    the last keyframe only (a recording grows by 30 frames a second; decoding all of it on
    every look would take seconds of CPU, and delay the look by as much)."""
    import io

    import av

    try:
        data = _flv_tail(path.read_bytes())
    except OSError:
        return None
    last = None
    with (
        contextlib.suppress(av.error.InvalidDataError, av.error.EOFError, OSError),
        av.open(io.BytesIO(data), format="flv") as container,
    ):
        for frame in container.decode(video=0):
            last = frame
    return None if last is None else last.to_ndarray(format="rgb24")


def decode_audio(path: Path) -> list[tuple[float, object]]:
    """(pts seconds, float32 mono samples) of the audio frames of a recording."""
    import av

    out: list[tuple[float, object]] = []
    with (
        contextlib.suppress(av.error.InvalidDataError, av.error.EOFError, OSError),
        av.open(str(path)) as container,
    ):
        if not container.streams.audio:
            return out
        for frame in container.decode(audio=0):
            samples = frame.to_ndarray()
            mono = samples.mean(axis=0) if samples.ndim == 2 else samples
            out.append((float(frame.time or 0.0), mono))
    return out
