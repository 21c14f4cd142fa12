"""The native extension (spaces.media._dataplane); everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "spaces.media._dataplane",
            sources=["media-node/native/dataplane.c"],
            # libsrtp2 (Debian's libsrtp2-dev) for SRTCP; libcrypto (libssl-dev) for SRTP.
            libraries=["srtp2", "crypto"],
            extra_compile_args=[
                "-O2",
                "-g",
                "-Wall",
                "-Wextra",
                "-Wno-missing-field-initializers",
                # SHA1_Init/Update: HMAC with precomputed pads, the cheapest per packet.
                "-Wno-deprecated-declarations",
            ],
        )
    ]
)
