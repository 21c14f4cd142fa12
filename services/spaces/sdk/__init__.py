"""The Python SDK: server-side token signing and the client (Space)."""
