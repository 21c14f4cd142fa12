"""Which simulcast layer each subscriber receives: the policy, with no packets in it.

A subscriber's video subscriptions share its estimated bandwidth (``spaces.media.bwe``). Each
gets at most the layer its client asked for (a quality, or the size it renders at), and only
layers the publisher is sending now. The allocation gives every track its lowest layer first,
then raises tracks one layer at a time while the budget lasts, screen shares first. A raise
needs headroom (``UP_HEADROOM``) and a steady estimate (``UP_HOLD_S``); a cut happens at once.
A raise the client itself asked for (its request now allows more than it receives) needs no
hold: the hold smooths a noisy estimate, and a request is not noise (``request_need`` tells the
estimator what to try for it, ``spaces.media.bwe.Estimator.probe``).
When even the lowest layers do not fit, the subscriber gets no video at all (audio only) until
the estimate recovers past ``RESUME_HEADROOM``.

The result is a target layer per subscription; the DownTrack switches to it at that layer's
next keyframe (``forwarding.DownTrack.follow``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

QUALITIES = ("low", "medium", "high")
OFF = "off"

LAYER_STALE_S = 1.5
"""A layer with no packet for this long is not being sent (the publisher's own congestion
control or dynacast paused it)."""
UP_HEADROOM = 1.15
"""A layer up needs the estimate to exceed the new total by this factor."""
UP_HOLD_S = 2.0
"""...and the estimate to have allowed it for this long."""
AUDIO_ONLY_AFTER_S = 1.0
"""Audio only needs the estimate below the lowest layers this long (one low reading is noise;
meanwhile the lowest layers are sent)."""
RESUME_HEADROOM = 1.3
"""Audio only ends once the estimate exceeds the lowest layers' total by this factor."""
AUDIO_BITRATE = 40_000
"""Reserved per subscribed audio track before video is allocated (Opus at a browser's 32 kbps
and its packets' overhead)."""


@dataclass(frozen=True, slots=True)
class VideoRequest:
    """What a client asked for one remote video track. Empty: no limit."""

    quality: str = ""
    """"low", "medium", "high", "off" (no video), or "" (no limit)."""
    width: int = 0
    height: int = 0
    """The size the client renders the track at (0: unknown)."""

    def __post_init__(self) -> None:
        if self.quality not in ("", OFF, *QUALITIES):
            raise ValueError("quality must be low, medium, high or off")
        if self.width < 0 or self.height < 0:
            raise ValueError("a rendered size cannot be negative")


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """One layer of a track as the policy sees it."""

    bitrate: int
    width: int = 0
    height: int = 0
    live: bool = True


def max_layer(layers: Sequence[LayerInfo], request: VideoRequest) -> int:
    """The highest layer index ``request`` allows (-1: none)."""
    if not layers or request.quality == OFF:
        return -1
    top = len(layers) - 1
    if request.quality:
        top = min(top, round(QUALITIES.index(request.quality) * top / (len(QUALITIES) - 1)))
    if request.width or request.height:
        # The smallest layer that covers the rendered size; the top one if none does.
        for index, layer in enumerate(layers[: top + 1]):
            if layer.width >= request.width and layer.height >= request.height:
                return index
    return top


@dataclass(slots=True)
class Wanted:
    """One video subscription's input to the allocation."""

    key: str
    layers: Sequence[LayerInfo]
    """Lowest first; a track without simulcast has one."""
    request: VideoRequest
    current: int = -1
    """The layer it receives (or will at the next keyframe); -1: none."""
    priority: int = 0
    """Higher first when raising (screen shares)."""


@dataclass(frozen=True, slots=True)
class Allocation:
    targets: dict[str, int]
    """key -> layer index (-1: no video)."""
    audio_only: bool
    """The estimate cannot carry even the lowest layers."""
    needed: int
    """bits per second the targets take."""
    floor: int = 0
    """bits per second the lowest live layers (and the audio) take: below it, audio only."""
    raised: bool = False
    """Some subscription goes to a higher layer than it receives."""
    at_floor: bool = False
    """Every video subscription gets its lowest live layer (or none)."""


class Allocator:
    """One subscriber's allocation, with the memory hysteresis needs."""

    def __init__(self) -> None:
        self.audio_only = False
        self._up_since: dict[str, float] = {}
        self._below_since: float | None = None

    def allocate(
        self,
        wanted: Sequence[Wanted],
        budget: int | None,
        now: float,
        audio_tracks: int = 0,
        allow_raise: bool = True,
        requested: Collection[str] = (),
    ) -> Allocation:
        """``budget``: the estimated bandwidth (None: unknown, so no limit). ``allow_raise``
        false: no subscription goes above what it receives (the estimator backs off).
        ``requested``: subscriptions whose client just asked for more than they receive,
        raised (within the budget) without the hold."""
        ceilings = {item.key: _ceiling(item) for item in wanted}
        if budget is None:
            self.audio_only = False
            targets = dict(ceilings)
            raised = any(targets[i.key] > i.current for i in wanted)
            return Allocation(targets, False, _cost(wanted, targets), raised=raised)
        available = budget - audio_tracks * AUDIO_BITRATE
        floors = {
            i.key: _lowest_live(i.layers, ceilings[i.key]) for i in wanted if ceilings[i.key] >= 0
        }
        floor_cost = sum(i.layers[floors[i.key]].bitrate for i in wanted if i.key in floors)
        floor = floor_cost + audio_tracks * AUDIO_BITRATE
        resume = RESUME_HEADROOM if self.audio_only else 1.0
        below = bool(floors) and available < floor_cost * resume
        if below and self._below_since is None:
            self._below_since = now
        elif not below:
            self._below_since = None
        entering = below and now - (self._below_since or now) >= AUDIO_ONLY_AFTER_S
        if floors and (
            (self.audio_only and (below or not allow_raise)) or (not self.audio_only and entering)
        ):
            self.audio_only = True
            self._up_since.clear()
            targets = {i.key: -1 for i in wanted}
            return Allocation(targets, True, 0, floor, at_floor=True)
        self.audio_only = False
        targets = {i.key: floors.get(i.key, -1) for i in wanted}
        spent = floor_cost
        # Keep what each receives already where it still fits (cuts are immediate, raises wait).
        order = sorted(wanted, key=lambda i: -i.priority)
        for item in order:
            keep = min(item.current, ceilings[item.key])
            target = targets[item.key]
            while keep > target and not item.layers[keep].live:
                keep -= 1
            if keep > target:
                extra = item.layers[keep].bitrate - item.layers[target].bitrate
                if spent + extra <= available:
                    targets[item.key] = keep
                    spent += extra
        # Raise one layer at a time, highest priority first, while the budget has headroom.
        raised = True
        seen_up: set[str] = set()
        while raised:
            raised = False
            for item in order:
                target = targets[item.key]
                nxt = target + 1
                while nxt <= ceilings[item.key] and not item.layers[nxt].live:
                    nxt += 1
                if target < 0 or nxt > ceilings[item.key]:
                    continue
                if nxt > item.current and not allow_raise:
                    continue
                extra = item.layers[nxt].bitrate - item.layers[target].bitrate
                if (spent + extra) * UP_HEADROOM > available:
                    continue
                if nxt > item.current and item.key not in requested:
                    # A raise beyond what it receives now must have been possible for a while.
                    seen_up.add(item.key)
                    since = self._up_since.setdefault(item.key, now)
                    if now - since < UP_HOLD_S:
                        continue
                targets[item.key] = nxt
                spent += extra
                raised = True
        for key in list(self._up_since):
            if key not in seen_up:
                del self._up_since[key]
        raised = False
        for key, target in targets.items():
            if target > _current(wanted, key):
                self._up_since.pop(key, None)
                raised = True
        at_floor = all(targets[i.key] == floors.get(i.key, -1) for i in wanted)
        return Allocation(targets, False, spent, floor, raised, at_floor)


def request_need(wanted: Sequence[Wanted], key: str, audio_tracks: int = 0) -> int | None:
    """The budget at which subscription ``key`` gets the highest live layer its request
    allows while the others keep what they receive (their lowest live layer at least), with a
    raise's headroom; None when that layer is not above what ``key`` receives."""
    for item in wanted:
        if item.key == key:
            top = _ceiling(item)
            if top < 0 or top <= item.current:
                return None
            return _raise_need(wanted, item, top, audio_tracks)
    return None


def next_need(wanted: Sequence[Wanted], audio_tracks: int = 0) -> int | None:
    """The least budget at which some subscription goes one live layer above what it receives
    (the others keep what they receive, their lowest live layer at least), with a raise's
    headroom; None when none can go higher. The estimator may grow to it without padding to
    probe with: the raise itself is the probe, and congestion after it cuts and backs off."""
    needs = []
    for item in wanted:
        top = _ceiling(item)
        if item.current < 0:
            continue
        nxt = item.current + 1
        while nxt <= top and not item.layers[nxt].live:
            nxt += 1
        if nxt <= top:
            needs.append(_raise_need(wanted, item, nxt, audio_tracks))
    return min(needs, default=None)


def _raise_need(wanted: Sequence[Wanted], raised: Wanted, layer: int, audio_tracks: int) -> int:
    """The budget for ``raised`` on ``layer`` while the others keep what they receive (their
    lowest live layer at least), with a raise's headroom and the audio."""
    total = 0
    for item in wanted:
        top = _ceiling(item)
        if top < 0:
            continue
        if item is raised:
            index = layer
        else:
            index = max(min(item.current, top), _lowest_live(item.layers, top))
        total += item.layers[index].bitrate
    return math.ceil(total * UP_HEADROOM) + audio_tracks * AUDIO_BITRATE


def _ceiling(item: Wanted) -> int:
    """The highest layer ``item``'s request allows that is being sent (-1: none)."""
    top = max_layer(item.layers, item.request)
    while top >= 0 and not item.layers[top].live:
        top -= 1
    return top


def _lowest_live(layers: Sequence[LayerInfo], ceiling: int) -> int:
    for index in range(ceiling + 1):
        if layers[index].live:
            return index
    return ceiling


def _current(wanted: Sequence[Wanted], key: str) -> int:
    return next((i.current for i in wanted if i.key == key), -1)


def _cost(wanted: Sequence[Wanted], targets: dict[str, int]) -> int:
    return sum(i.layers[targets[i.key]].bitrate for i in wanted if targets.get(i.key, -1) >= 0)
