"""PresenceService: admission with a JWT, leases, participants and events."""
