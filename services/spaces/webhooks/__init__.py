"""Signed, at-least-once webhook delivery in Mux's format."""
