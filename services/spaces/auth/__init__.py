"""Signing keys, JWT verification and the admin credential."""
