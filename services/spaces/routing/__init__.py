"""The media node registry and space placement (LiveKit's "routing")."""
