"""A subscriber's available bandwidth, estimated from its RTCP feedback (the GCC family).

Google Congestion Control (draft-ietf-rmcat-gcc) has a delay-based part and a loss-based part,
and takes the smaller. Here the subscriber's browser runs the delay-based part itself: it
watches the arrival delay of our packets (each carries abs-send-time) and reports its estimate
by REMB, cutting it to 0.85 of what it receives when it sees queues grow. The node does not
negotiate transport-cc with subscribers (aiortc has no transport-wide sequence numbers), so
that REMB is the delay signal. The node runs the loss-based part, on the fraction lost in each
receiver report and, faster, on the share of packets the subscriber NACKs:

* **congestion**: loss above ``LOSS_HIGH`` (NACK loss: the distinct packets NACKed in a
  tick over the most packets sent in any tick of the last 2 s, since a NACK can come a tick
  after its packet and a browser repeats them) cuts the estimate to what arrived, the rate sent
  (the most sent in any tick of the last 2 s, the span a report covers) times ``1 - loss``, less
  ``DELIVERED_MARGIN`` (GCC cuts to ``1 - loss / 2`` of its estimate and
  repeats; after a layer switch the rate sent can be several times the link, and one step to
  what arrived settles at once); a REMB that falls by more than ``REMB_DROP`` from the last one
  and lies below ``REMB_OVERUSE`` of the rate sent (the browser saw its queue grow) cuts it to
  that REMB;
* **otherwise** the estimate grows by ``GROWTH_PER_S`` a second (GCC grows 8% a second and
  probes with padding to go faster; this node probes by raising a layer instead), up to
  ``CAP_FACTOR`` times what is sent, and never less than twice the lowest layers' need, so
  that a subscriber on audio only can come back;
* after a cut, loss and REMB are ignored for ``CUT_HOLD_S``: they describe packets sent before
  it (a receiver report covers the last second);
* a loss cut goes no lower than the lowest layers' need (``floor_need``): on a link that
  suddenly narrows, the loss of a queue overflowing says little about how narrow (NACKs and
  reports lag the rate sent), and one step to audio only would leave the subscriber there for
  a whole backoff; below the lowest layers is a falling REMB's call (next point);
* no cut while no video is sent (audio only): audio only comes from the allocation, not from
  audio's own losses; while only the lowest layers are sent, loss does not cut (NACKs repair
  it, and a loaded machine or a subscriber's first packets lose some with no narrow link),
  only a falling REMB does (the browser measured the queue growing): that is the way down to
  audio only;
* right after a cut (``congested``) NACKs are not answered while the subscriber still waits
  for the lower layer's keyframe: resending into the queue that caused the loss makes it
  worse, and the switch brings a keyframe anyway (once on the lower layer, they are);
* a client's request for more than the estimate carries is tried at once (``probe``): the
  estimate goes to what the requested layer needs, unless a backoff is on;
* after a cut, raises wait ``BACKOFF_S``; a cut within ``FAILED_RAISE_S`` of a layer raise
  means the raise was too much, and doubles the wait (up to ``BACKOFF_MAX_S``), this cut's wait
  included; a raise that holds for ``FAILED_RAISE_S`` resets it. The node probes by raising a
  layer (no padding probes): a failed probe costs the subscriber the higher layer's keyframe
  stuck in the queue and a freeze of one to two seconds while it goes back down, so after a
  congestion the first probe waits long enough (``BACKOFF_S``) that a link that stays narrow
  sees few of them.

A browser's REMB starts at what it receives, grows 8% a second and at most to 1.5 times what it
receives: right after a layer goes up it lies far below the new rate without any congestion
(measured: 140 kbps REMB for 600 kbps sent on an unshaped link). So a low REMB alone is not a
signal; a falling one is (on overuse the browser cuts it to 0.85 of what it receives).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

START_BPS = 500_000
"""Before any feedback: enough for the lowest and middle layers' total, not the top one."""
LOSS_HIGH = 0.10
NACK_HIGH = 0.10
DELIVERED_MARGIN = 0.9
REMB_OVERUSE = 0.85
REMB_DROP = 0.2
GROWTH_PER_S = 1.25
CAP_FACTOR = 4.0
MIN_CAP_BPS = 300_000
MIN_BPS = 30_000
CUT_HOLD_S = 1.5
FAILED_RAISE_S = 4.0
BACKOFF_S = 12.0
BACKOFF_MAX_S = 30.0
PACKET_OVERHEAD_BYTES = 60
"""RTP header and extensions, SRTP tag, UDP and IP headers: counted on top of each payload."""
CUT_HISTORY = 16
"""How many of its latest cuts an estimator keeps (``Estimator.history``)."""


@dataclass(frozen=True)
class Cut:
    """One cut of the estimate and the feedback that made it (``Estimator.history``)."""

    at: float
    """``time.monotonic()`` of the tick that cut."""
    reason: str
    """``loss`` (receiver reports), ``nack`` (NACKed share of packets) or ``remb``."""
    report_loss: float
    """The highest fraction lost in the tick's receiver reports."""
    nack_loss: float
    """Distinct packets NACKed in the tick over the most packets sent in a tick of the last 2 s."""
    nacks: int
    remb: int | None
    previous_remb: int | None
    sent_bps: int
    """What the tick sent."""
    sent_then_bps: int
    """The most sent in a tick of the last 2 s (what loss is judged against)."""
    before: int
    after: int

    def __str__(self) -> str:
        return (
            f"{self.reason} cut {self.before} -> {self.after} bps at {self.at:.2f}: "
            f"report loss {self.report_loss:.2f}, nack loss {self.nack_loss:.2f} "
            f"({self.nacks} nacks), remb {self.remb} (was {self.previous_remb}), "
            f"sent {self.sent_bps} bps (then {self.sent_then_bps})"
        )


class Estimator:
    """One subscriber's estimate. Feed it feedback (``on_report``, ``on_remb``, ``on_nack``)
    and call ``tick`` periodically with what was sent since the last tick."""

    def __init__(self, now: float, start_bps: int = START_BPS) -> None:
        self.estimate = start_bps
        self.sent_bps = 0
        self._last_tick = now
        self._last_cut = -1e9
        self._last_raise = -1e9
        self._blocked_until = -1e9
        self._backoff = BACKOFF_S
        self._nacked: set[int] = set()
        self._remb: int | None = None
        self._last_remb: int | None = None
        self._loss = 0.0
        self.cuts = 0
        self.history: deque[Cut] = deque(maxlen=CUT_HISTORY)
        """The latest cuts, oldest first: why each was made (for logs and diagnosis)."""
        self._recent_sent: list[int] = []
        self._recent_packets: list[int] = []

    # --- feedback -------------------------------------------------------------------------

    def on_report(self, fraction_lost: float) -> None:
        """A receiver report's fraction lost (0..1) for one of the subscriber's streams."""
        self._loss = max(self._loss, fraction_lost)

    def on_remb(self, bitrate: int) -> None:
        self._remb = bitrate if self._remb is None else min(self._remb, bitrate)

    def on_nack(self, sequence_number: int) -> None:
        """One NACKed packet (a DownTrack's sequence number) still worth resending."""
        self._nacked.add(sequence_number)

    # --- decisions ------------------------------------------------------------------------

    def tick(
        self,
        now: float,
        sent_bytes: int,
        sent_packets: int,
        floor_need: int,
        video_off: bool,
        at_floor: bool = False,
        next_need: int | None = None,
    ) -> int:
        """Update from the feedback since the last tick and what was sent meanwhile
        (``floor_need``: what the lowest layers of the subscriptions need; ``video_off``: the
        subscriber gets audio only; ``at_floor``: it gets the lowest layers). Returns the
        estimate."""
        elapsed = max(now - self._last_tick, 1e-3)
        self._last_tick = now
        sent_bps = int((sent_bytes + sent_packets * PACKET_OVERHEAD_BYTES) * 8 / elapsed)
        self.sent_bps = sent_bps
        # Reports describe up to the last second or two: what was sent then is the rate lost of.
        self._recent_sent = [*self._recent_sent[-3:], sent_bps]
        self._recent_packets = [*self._recent_packets[-3:], sent_packets]
        sent_then = max(self._recent_sent)
        packets_then = max(self._recent_packets)
        nacks = len(self._nacked)
        nack_loss = min(nacks / packets_then, 1.0) if packets_then else 0.0
        loss = max(self._loss, nack_loss)
        report_loss = self._loss
        remb, self._remb, self._loss = self._remb, None, 0.0
        self._nacked.clear()
        cut: int | None = None
        reason = ""
        if loss > LOSS_HIGH and sent_then and not at_floor:
            delivered = int(sent_then * (1 - loss) * DELIVERED_MARGIN)
            cut = max(delivered, floor_need)
            reason = "loss" if report_loss >= nack_loss else "nack"
        previous = self._last_remb
        if remb is not None:
            self._last_remb = remb
            falling = previous is not None and remb < previous * (1 - REMB_DROP)
            if (
                falling
                and sent_bps
                and remb < REMB_OVERUSE * sent_bps
                and (cut is None or remb < cut)
            ):
                cut, reason = remb, "remb"
        if cut is not None and now - self._last_cut < CUT_HOLD_S:
            pass  # feedback about what was sent before the last cut
        elif cut is not None and video_off:
            pass  # audio only: its own losses change nothing
        elif cut is not None and cut < self.estimate:
            before = self.estimate
            self._cut(max(cut, MIN_BPS), now)
            self.history.append(
                Cut(
                    now,
                    reason,
                    report_loss,
                    nack_loss,
                    nacks,
                    remb,
                    previous,
                    sent_bps,
                    sent_then,
                    before,
                    self.estimate,
                )
            )
        elif now - self._last_cut >= 1.0:
            cap = max(CAP_FACTOR * sent_bps, 2 * floor_need, MIN_CAP_BPS)
            if next_need is not None and self.may_raise(now):
                # What the next layer up needs (``layers.next_need``): a quiet scene sends well
                # below its layers' nominal rates, so CAP_FACTOR times what is sent can stay
                # short of the next layer for good. The raise is the probe.
                cap = max(cap, next_need)
            if self.estimate < cap:
                self.estimate = int(min(self.estimate * GROWTH_PER_S**elapsed, cap))
            if self._last_raise > 0 and now - self._last_raise >= FAILED_RAISE_S:
                self._backoff = BACKOFF_S  # the last raise held
        return self.estimate

    def _cut(self, estimate: int, now: float) -> None:
        self.estimate = estimate
        self.cuts += 1
        self._last_cut = now
        # Congestion means the layers were above the link: wait before trying higher again,
        # longer each time a raise is what caused it.
        if now - self._last_raise < FAILED_RAISE_S:
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
        self._blocked_until = now + self._backoff

    def congested(self, now: float) -> bool:
        """Right after a cut: retransmissions would only add to the queue that caused it."""
        return now - self._last_cut < CUT_HOLD_S

    def may_raise(self, now: float) -> bool:
        """Whether a layer may go up now (not right after a cut, nor during a backoff)."""
        return now >= self._blocked_until and now - self._last_cut >= 1.0

    def probe(self, goal_bps: int, now: float) -> bool:
        """The client asked for a layer the estimate does not carry yet: try it at once (the
        node probes by raising a layer, here the one asked for) rather than grow into it at
        ``GROWTH_PER_S``, within ``CAP_FACTOR`` of the lower layer's rate, which takes many
        seconds. Not during a backoff: congestion is recent, and the request does not widen the
        link. Returns whether the estimate now carries ``goal_bps``; the caller's raise then
        counts as one (``raised``), so congestion right after it doubles the next backoff."""
        if goal_bps <= self.estimate:
            return True
        if not self.may_raise(now):
            return False
        self.estimate = goal_bps
        return True

    def raised(self, now: float) -> None:
        """A layer went up: a cut soon after means it was too much."""
        self._last_raise = now
