"""Request streams of gRPC calls, closed when a handler stops reading them early.

grpc.aio hands a handler its request stream as an async generator that sits in a reference
cycle with the call's state (``_MessageReceiver._agen``, whose frame holds the receiver, which
holds the servicer context and the C call); Cython keeps that closure even once the generator
has finished. So every call whose handler iterated its request stream lived, with its C
memory, until the next full garbage collection, which in a long-lived process can be minutes
away: a media node held megabytes of finished calls that way (tests/test_churn_soak.py,
docs/soak.md). The servers' interceptor (spaces.interceptors) therefore reads requests with
``context.read()`` into a generator of its own, which holds no cycle; this module closes that
one as soon as a handler is done with it, so nothing waits for its finalizer."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any


async def close_stream(stream: AsyncIterator[Any]) -> None:
    """Close ``stream`` if it is an async generator (a plain async iterator has nothing to
    close). A generator already finished, or one that ended with an error, closes as a no-op;
    one that another task is reading right now is left to that task (which closes it when it
    stops: the session's reader does)."""
    if not inspect.isasyncgen(stream) or stream.ag_running:
        return
    await stream.aclose()
