"""Which simulcast layers a publisher needs to send (LiveKit's dynacast): the policy, no I/O.

Each subscription of a simulcast track may want up to one layer: the highest its client's
request allows (a quality, or the size it renders at; ``layers.max_layer``). The estimate does
not enter: the allocation raises a subscriber only to layers being sent, so pausing a layer
because one link cannot carry it now would keep that subscriber below it for good. A subscriber
on audio only counts like any other (it needs the lowest layer to come back), and so does a
subscription still waiting for its subscriber answer.

The publisher is asked to send every layer up to the highest wanted one, as LiveKit does
("enabled: q <= max subscribed quality"): the lower ones are what a subscriber falls back to at
once when its link narrows. With no subscriber, or none that wants video, nothing is wanted and
every layer pauses, again as LiveKit does (its max subscribed quality is then OFF); the first
subscription un-pauses them.

A layer pauses only once it has been unneeded for ``PAUSE_AFTER_S`` (and not before the track
has been published that long), so a subscriber going down and back up, or leaving and joining
again, costs the publisher no encoder restart; it resumes at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from spaces.media.layers import LayerInfo, VideoRequest, max_layer

PAUSE_AFTER_S = 2.5
"""A layer no subscription wants is paused after this long (LiveKit: its dynacast pause
delay)."""


def wanted_top(layers: Sequence[LayerInfo], requests: Iterable[VideoRequest]) -> int:
    """The highest layer index any of these subscriptions' requests allows (-1: none wants
    video)."""
    return max((max_layer(layers, request) for request in requests), default=-1)


class LayerDemand:
    """One simulcast track's layers that the publisher should send, debounced."""

    def __init__(self, rids: Sequence[str], now: float) -> None:
        if not rids:
            raise ValueError("a layer demand needs the track's rids")
        self.rids = tuple(rids)
        """Lowest layer first."""
        self.sending = len(self.rids)
        """How many layers, from the lowest, the publisher is asked to send (a browser starts
        with every encoding active)."""
        self._needed_at = [now] * len(self.rids)
        """Per layer: when some subscription last wanted it (publication counts)."""

    @property
    def paused(self) -> int:
        """Layers the publisher is asked not to send."""
        return len(self.rids) - self.sending

    def update(self, top: int, now: float) -> tuple[str, ...] | None:
        """``top``: the highest layer wanted now (-1: none). Returns the rids to send when
        that changes (the publisher is to be told), else None."""
        top = min(top, len(self.rids) - 1)
        for index in range(top + 1):
            self._needed_at[index] = now
        sending = top + 1
        # Layers above the wanted ones keep going until each has been unneeded long enough.
        for index in range(len(self.rids) - 1, top, -1):
            if index < self.sending and now - self._needed_at[index] < PAUSE_AFTER_S:
                sending = index + 1
                break
        if sending == self.sending:
            return None
        self.sending = sending
        return self.rids[:sending]
