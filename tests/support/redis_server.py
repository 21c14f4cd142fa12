"""Private redis-server processes on free loopback ports, for isolation and fault tests: the
same launcher `spaces cluster` uses."""

from __future__ import annotations

from spaces.cluster import RedisProcess, free_port, redis_server_binary

RedisServer = RedisProcess

__all__ = ["RedisServer", "free_port", "redis_server_binary"]
