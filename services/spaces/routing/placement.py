"""Space -> media node placement.

All participants of a space share one node. The mapping is sticky (a lease the hosting node
renews), re-checked on every join: a node that is stale, draining or gone is replaced. New
spaces go to the less loaded of two random available nodes (LiveKit's "two random choices"),
which spreads load without every presence replica herding onto the same least-loaded node.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from spaces import errors, metrics
from spaces.routing.registry import NodeDirectory
from spaces.v1 import node_pb2


@dataclass(frozen=True)
class Placement:
    node: node_pb2.Node
    reason: str
    """"sticky" (kept the current node), "new" (no node yet) or "replaced" (old one unusable)."""


def has_capacity(node: node_pb2.Node) -> bool:
    return node.max_sessions == 0 or node.sessions < node.max_sessions


def two_choices(candidates: list[node_pb2.Node], rng: random.Random) -> node_pb2.Node:
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(candidates, 2)
    return a if (a.load, a.sessions) <= (b.load, b.sessions) else b


class Placer:
    def __init__(self, directory: NodeDirectory, rng: random.Random | None = None) -> None:
        self._directory = directory
        self._rng = rng or random.Random()

    async def place(self, current_node_id: str) -> Placement:
        """Keep ``current_node_id`` if it is still available, otherwise choose a node."""
        available, _ = await self._directory.available()
        if current_node_id:
            current = next((n for n in available if n.id == current_node_id), None)
            if current is not None:
                return Placement(current, "sticky")
        if not available:
            raise errors.NoMediaNode()
        candidates = [n for n in available if has_capacity(n)]
        if not candidates:
            raise errors.NoMediaCapacity()
        reason = "replaced" if current_node_id else "new"
        metrics.PLACEMENTS.labels(reason=reason).inc()
        return Placement(two_choices(candidates, self._rng), reason)
