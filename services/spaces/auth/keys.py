"""Signing key generation. Only the public half is ever stored."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

KEY_BITS = 2048


@dataclass(frozen=True)
class GeneratedKey:
    public_key_pem: bytes
    """SubjectPublicKeyInfo PEM, stored."""
    private_key_b64: str
    """Base64 of the PKCS#1 PEM ("BEGIN RSA PRIVATE KEY"), as Mux returned it; never stored."""


def generate_signing_key() -> GeneratedKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    private_pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.TraditionalOpenSSL,
        encryption_algorithm=serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    return GeneratedKey(
        public_key_pem=public_pem, private_key_b64=base64.b64encode(private_pem).decode()
    )
