"""Checks for CreateBroadcast: the RTMP URL, the layout and resolution, the background image.

Everything is checked before anything is stored, so a bad request leaves nothing behind. The
background is fetched (URL), read (path) or taken (bytes) once, at create, verified to be a PNG
or JPEG, and stored with the broadcast: workers never depend on the URL staying reachable.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from spaces import errors
from spaces.store.codec import LAYOUT_NAMES, RESOLUTION_NAMES
from spaces.v1 import broadcast_pb2

MAX_URL_CHARS = 2048
MAX_KEY_CHARS = 512
IMAGE_FORMATS = frozenset({"PNG", "JPEG"})


@dataclass(frozen=True)
class RtmpTarget:
    url: str
    """Server and app, without the stream key."""
    stream_key: str

    @property
    def full_url(self) -> str:
        return f"{self.url}/{self.stream_key}" if self.stream_key else self.url


def _printable(value: str) -> bool:
    return value.isprintable() and not any(c.isspace() for c in value)


def parse_rtmp(url: str, stream_key: str) -> RtmpTarget:
    """rtmp(s)://host[:port]/app + key, or the whole URL with the key as its last segment."""
    if not url or len(url) > MAX_URL_CHARS or not _printable(url):
        raise errors.InvalidRtmpUrl()
    if len(stream_key) > MAX_KEY_CHARS or (stream_key and not _printable(stream_key)):
        raise errors.InvalidRtmpUrl("stream_key must be printable, without spaces")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise errors.InvalidRtmpUrl() from exc
    if parts.scheme not in ("rtmp", "rtmps") or not parts.hostname:
        raise errors.InvalidRtmpUrl()
    if port == 0 or parts.query or parts.fragment or parts.username or parts.password:
        raise errors.InvalidRtmpUrl("rtmp_url must have no credentials, query or fragment")
    path = parts.path.strip("/")
    if not path:
        raise errors.InvalidRtmpUrl("rtmp_url needs an application path, e.g. rtmp://host/live")
    base = f"{parts.scheme}://{parts.netloc}"
    if stream_key:
        return RtmpTarget(f"{base}/{path}", stream_key.strip("/"))
    app, _, key = path.rpartition("/")
    if not app:
        # rtmp://host/app alone: no key (some servers take the stream name from the app).
        return RtmpTarget(f"{base}/{path}", "")
    return RtmpTarget(f"{base}/{app}", key)


def layout_name(value: int) -> str:
    if value == broadcast_pb2.BROADCAST_LAYOUT_UNSPECIFIED:
        return "gallery"
    name = LAYOUT_NAMES.get(value)  # type: ignore[call-overload]
    if name is None:
        raise errors.InvalidArgument("unknown layout: use GALLERY, ACTIVE_SPEAKER or CROP")
    return str(name)


def resolution_name(value: int) -> str:
    if value == broadcast_pb2.BROADCAST_RESOLUTION_UNSPECIFIED:
        return "1920x1080"
    name = RESOLUTION_NAMES.get(value)  # type: ignore[call-overload]
    if name is None:
        raise errors.InvalidArgument(
            "unknown resolution: use one of 1920X1080, 1280X720, 1080X1920, 720X1280, "
            "1080X1080, 720X720"
        )
    return str(name)


@dataclass(frozen=True)
class Background:
    source: str
    """The URL, the path, "inline", or "" for none."""
    image: bytes
    sha256: str


NO_BACKGROUND = Background("", b"", "")


def check_image(data: bytes) -> None:
    """InvalidBackground unless ``data`` is a complete PNG or JPEG image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
            image.load()  # decodes it all: a truncated file fails here
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise errors.InvalidBackground("background is not a png or jpeg image") from exc
    if fmt not in IMAGE_FORMATS:
        raise errors.InvalidBackground(f"background is a {str(fmt).lower()}: use png or jpeg")


async def fetch_url(url: str, max_bytes: int, timeout_s: float) -> bytes:
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise errors.InvalidBackground("background url is malformed") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.InvalidBackground("background url must be http:// or https://")
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, allow_redirects=True, max_redirects=3) as reply,
        ):
            if reply.status != 200:
                raise errors.InvalidBackground(
                    f"background url answered http {reply.status}: it must serve the image"
                )
            data = await reply.content.read(max_bytes + 1)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise errors.InvalidBackground(
            f"background url is unreachable ({type(exc).__name__.lower()})"
        ) from exc
    if len(data) > max_bytes:
        raise errors.InvalidBackground(f"background is larger than {max_bytes} bytes")
    return data


def read_path(path: str, max_bytes: int) -> bytes:
    file = Path(path)
    if not path or not file.is_absolute():
        raise errors.InvalidBackground("background path must be an absolute file path")
    try:
        if file.stat().st_size > max_bytes:
            raise errors.InvalidBackground(f"background is larger than {max_bytes} bytes")
        return file.read_bytes()
    except FileNotFoundError as exc:
        raise errors.InvalidBackground("background file not found") from exc
    except (IsADirectoryError, PermissionError) as exc:
        raise errors.InvalidBackground("background path is not a readable file") from exc


async def load_background(
    request: broadcast_pb2.BackgroundImage | None, max_bytes: int, timeout_s: float
) -> Background:
    if request is None:
        return NO_BACKGROUND
    which = request.WhichOneof("source")
    if which is None:
        return NO_BACKGROUND
    if which == "url":
        data = await fetch_url(request.url, max_bytes, timeout_s)
        source = request.url
    elif which == "path":
        data = await asyncio.to_thread(read_path, request.path, max_bytes)
        source = request.path
    else:
        data = request.image
        source = "inline"
        if len(data) > max_bytes:
            raise errors.InvalidBackground(f"background is larger than {max_bytes} bytes")
    await asyncio.to_thread(check_image, data)
    return Background(source, data, hashlib.sha256(data).hexdigest())
