"""Shared state: the Store protocol and its memory and Redis implementations."""

from __future__ import annotations

from spaces.store.base import Store


def open_store(redis_url: str, *, event_maxlen: int = 100_000, gone_ttl_ms: int = 120_000) -> Store:
    """The Redis store when a URL is configured, otherwise the embedded memory store."""
    if redis_url:
        from spaces.store.redis import RedisStore

        return RedisStore(redis_url, event_maxlen=event_maxlen, gone_ttl_ms=gone_ttl_ms)
    from spaces.store.memory import MemoryStore

    return MemoryStore(event_maxlen=event_maxlen, gone_ttl_ms=gone_ttl_ms)


__all__ = ["Store", "open_store"]
