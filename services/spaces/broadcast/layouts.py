"""Where each participant goes in the frame: Mux's broadcast layouts, as pure geometry.

The rules follow Mux's published layout code for its LiveKit port (REFERENCE.md §6):

* **gallery**: up to 10 tiles on the background colour. Landscape frames use 60 px of padding,
  30 px gaps and 16:9 tiles; square frames 10 px padding (and gaps) and 1:1 tiles; portrait
  frames 16:9 tiles up to 4 participants, 1:1 beyond. The column count is the one that gives the
  largest tiles; a last row with fewer tiles is centred. A screen share in a landscape gallery
  takes the left, with the participants in a column 400 px wide (600 px beyond 5 participants);
  in other frames a screen share switches to the active-speaker view.
* **active-speaker**: the current speaker full frame; else the screen sharer; else the first
  participant with video.
* **crop**: tiles that fill the frame, with no padding or gaps; video is cropped to fill its
  tile. Rows are chosen as for the gallery; the last row's tiles widen to fill it. When the
  participants change, tiles move to their new places over 0.3 s.

Rectangles are in output pixels, with even coordinates and sizes (YUV 4:2:0 planes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MAX_TILES = 10
BACKGROUND_RGB = (0x32, 0x32, 0x32)
TRANSITION_S = 0.3


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    w: int
    h: int

    def lerp(self, other: Rect, t: float) -> Rect:
        def mix(a: int, b: int) -> int:
            return _even(a + (b - a) * t)

        return Rect(
            mix(self.x, other.x), mix(self.y, other.y), mix(self.w, other.w), mix(self.h, other.h)
        )


@dataclass(frozen=True)
class Tile:
    """One participant's place: ``key`` names the participant (or "<id>/screen")."""

    key: str
    rect: Rect
    fit: str = "cover"
    """"cover" crops the video to fill the tile; "contain" letterboxes it (screen shares)."""


@dataclass(frozen=True)
class Subject:
    """A participant as the layout sees it."""

    key: str
    has_video: bool = True
    screen: bool = False
    """This subject is a screen share (its key is "<participant>/screen")."""


def _even(v: float) -> int:
    return int(v) // 2 * 2


def shape(width: int, height: int) -> str:
    if width > height:
        return "landscape"
    if width < height:
        return "portrait"
    return "square"


def grid(count: int, width: int, height: int, pad: int, gap: int, aspect: float) -> list[Rect]:
    """``count`` tiles of one aspect ratio, as large as they can be: every column count is
    tried and the one with the largest tiles kept. The last row is centred."""
    if count <= 0:
        return []
    best: tuple[float, int, float, float] | None = None
    avail_w, avail_h = width - 2 * pad, height - 2 * pad
    for cols in range(1, count + 1):
        rows = -(-count // cols)
        cell_w = (avail_w - gap * (cols - 1)) / cols
        cell_h = (avail_h - gap * (rows - 1)) / rows
        if cell_w <= 0 or cell_h <= 0:
            continue
        tile_w = min(cell_w, cell_h * aspect)
        tile_h = tile_w / aspect
        if best is None or tile_w > best[0] + 1e-9:
            best = (tile_w, cols, tile_w, tile_h)
    if best is None:
        return []
    _, cols, tile_w_f, tile_h_f = best
    tile_w, tile_h = _even(tile_w_f), _even(tile_h_f)
    rows = -(-count // cols)
    total_h = rows * tile_h + (rows - 1) * gap
    top = pad + (avail_h - total_h) // 2
    rects = []
    for i in range(count):
        row, col = divmod(i, cols)
        in_row = cols if row < rows - 1 else count - cols * (rows - 1)
        row_w = in_row * tile_w + (in_row - 1) * gap
        left = pad + (avail_w - row_w) // 2
        rects.append(
            Rect(
                _even(left + col * (tile_w + gap)),
                _even(top + row * (tile_h + gap)),
                tile_w,
                tile_h,
            )
        )
    return rects


def gallery_params(count: int, width: int, height: int) -> tuple[int, int, float]:
    """(padding, gap, tile aspect) by frame shape and participant count."""
    kind = shape(width, height)
    if kind == "landscape":
        return 60, 30, 16 / 9
    if kind == "square":
        return 10, 10, 1.0
    return (10, 10, 16 / 9) if count <= 4 else (10, 10, 1.0)


def gallery(subjects: Sequence[Subject], width: int, height: int, speaker: str = "") -> list[Tile]:
    people = [s for s in subjects if not s.screen]
    screens = [s for s in subjects if s.screen]
    if screens:
        if shape(width, height) != "landscape":
            return active_speaker(subjects, width, height, speaker)
        return _screen_gallery(screens[0], people, width, height)
    shown = people[:MAX_TILES]
    pad, gap, aspect = gallery_params(len(shown), width, height)
    return [
        Tile(s.key, r)
        for s, r in zip(shown, grid(len(shown), width, height, pad, gap, aspect), strict=True)
    ]


def _screen_gallery(
    screen: Subject, people: Sequence[Subject], width: int, height: int
) -> list[Tile]:
    pad, gap = 60, 30
    shown = list(people[: MAX_TILES - 1])
    column = (400 if len(shown) <= 5 else 600) if shown else 0
    main_w = _even(width - 2 * pad - (column + gap if shown else 0))
    tiles = [Tile(screen.key, Rect(pad, pad, main_w, _even(height - 2 * pad)), "contain")]
    # The participants are a small gallery of their own, in the column right of the share.
    x0, area_h = pad + main_w + gap, height - 2 * pad
    for s, r in zip(shown, grid(len(shown), column, area_h, 0, gap // 2, 16 / 9), strict=True):
        tiles.append(Tile(s.key, Rect(_even(x0 + r.x), _even(pad + r.y), r.w, r.h)))
    return tiles


def pick_speaker(subjects: Sequence[Subject], speaker: str) -> Subject | None:
    """The current speaker; else the screen sharer; else the first participant with video;
    else the first participant."""
    by_key = {s.key: s for s in subjects}
    if speaker in by_key:
        return by_key[speaker]
    screens = [s for s in subjects if s.screen]
    if screens:
        return screens[0]
    with_video = [s for s in subjects if s.has_video]
    if with_video:
        return with_video[0]
    return subjects[0] if subjects else None


def active_speaker(
    subjects: Sequence[Subject], width: int, height: int, speaker: str = ""
) -> list[Tile]:
    chosen = pick_speaker(subjects, speaker)
    if chosen is None:
        return []
    return [Tile(chosen.key, Rect(0, 0, width, height), "contain" if chosen.screen else "cover")]


def crop(subjects: Sequence[Subject], width: int, height: int, speaker: str = "") -> list[Tile]:
    shown = [s for s in subjects if not s.screen][:MAX_TILES]
    screens = [s for s in subjects if s.screen]
    if screens:
        return active_speaker(subjects, width, height, speaker)
    count = len(shown)
    if count == 0:
        return []
    # Rows as the gallery would choose them (without padding), then fill the frame.
    _, _, aspect = gallery_params(count, width, height)
    probe = grid(count, width, height, 0, 0, aspect)
    cols = sum(1 for r in probe if r.y == probe[0].y)
    rows = -(-count // cols)
    tiles = []
    for i, s in enumerate(shown):
        row, col = divmod(i, cols)
        in_row = cols if row < rows - 1 else count - cols * (rows - 1)
        x0, x1 = _even(width * col / in_row), _even(width * (col + 1) / in_row)
        y0, y1 = _even(height * row / rows), _even(height * (row + 1) / rows)
        if col == in_row - 1:
            x1 = width
        if row == rows - 1:
            y1 = height
        tiles.append(Tile(s.key, Rect(x0, y0, x1 - x0, y1 - y0)))
    return tiles


LAYOUTS = {"gallery": gallery, "active-speaker": active_speaker, "crop": crop}


def layout(
    name: str, subjects: Sequence[Subject], width: int, height: int, speaker: str = ""
) -> list[Tile]:
    return LAYOUTS[name](subjects, width, height, speaker)


class Transition:
    """Moves tiles to a new layout over ``duration`` seconds (crop's 0.3 s transitions). Tiles
    that appear or disappear do so at once; tiles that stay glide from their old place."""

    def __init__(self, duration: float = TRANSITION_S) -> None:
        self.duration = duration
        self._from: dict[str, Rect] = {}
        self._to: list[Tile] = []
        self._started = 0.0

    def update(self, tiles: list[Tile], now: float) -> list[Tile]:
        if [(t.key, t.rect) for t in tiles] != [(t.key, t.rect) for t in self._to]:
            current = {t.key: t.rect for t in self.current(now)}
            self._from = current
            self._to = tiles
            self._started = now
        return self.current(now)

    def current(self, now: float) -> list[Tile]:
        t = 1.0 if self.duration <= 0 else min(1.0, (now - self._started) / self.duration)
        out = []
        for tile in self._to:
            start = self._from.get(tile.key)
            rect = tile.rect if start is None or t >= 1.0 else start.lerp(tile.rect, t)
            out.append(Tile(tile.key, rect, tile.fit))
        return out
