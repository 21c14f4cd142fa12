"""Broadcasts: BroadcastService, the broadcaster worker pool, and the composer it runs."""
