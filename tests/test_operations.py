"""What operators rely on: TLS for gRPC and Redis, the Prometheus endpoint, JSON logs, and a
plaintext health listener for probes when gRPC uses TLS."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spaces.cluster import free_port, redis_server_binary
from spaces.config import TlsConfig
from spaces.sdk import client as sdk
from spaces.sdk.media import TestPatternTrack, read_pattern, same_color
from spaces.v1 import space_pb2, space_pb2_grpc
from tests.support.system import (
    ADMIN_KEY,
    Admin,
    Process,
    Tenant,
    eventually,
    make_config,
    start_server,
    wait_serving,
)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost."""
    directory = tmp_path_factory.mktemp("tls")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spaces-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_grpc_over_tls_end_to_end_with_plaintext_health_for_probes(
    certificate: tuple[Path, Path],
) -> None:
    cert_file, key_file = certificate
    health_port = free_port()
    config = replace(
        make_config(),
        tls=TlsConfig(cert_file=str(cert_file), key_file=str(key_file)),
        health_addr=f"127.0.0.1:{health_port}",
    )
    server = await start_server(config)
    credentials = grpc.ssl_channel_credentials(root_certificates=cert_file.read_bytes())
    try:
        async with grpc.aio.secure_channel(server.address, credentials) as channel:
            stub = space_pb2_grpc.SpaceServiceStub(channel)
            space_id = (
                await stub.CreateSpace(
                    space_pb2.CreateSpaceRequest(),
                    metadata=(("authorization", f"Bearer {ADMIN_KEY}"),),
                )
            ).id
            from spaces.v1 import signing_key_pb2, signing_key_pb2_grpc

            key = await signing_key_pb2_grpc.SigningKeyServiceStub(channel).CreateSigningKey(
                signing_key_pb2.CreateSigningKeyRequest(),
                metadata=(("authorization", f"Bearer {ADMIN_KEY}"),),
            )
        tenant = Tenant(key)
        # Presence and the media node session both go over TLS.
        publisher = sdk.Space(
            tenant.token(space_id, "pub"), server.address, credentials=credentials
        )
        viewer = sdk.Space(tenant.token(space_id, "view"), server.address, credentials=credentials)
        await publisher.join()
        await viewer.join()
        await publisher.local.publish(TestPatternTrack((30, 144, 255)), "camera")
        track = await eventually(lambda: viewer.remote_track("pub", "camera"))
        await eventually(lambda: track.frames_received > 5, timeout=15)
        assert same_color(read_pattern(track.last_frame)[0], (30, 144, 255))
        await publisher.leave()
        await viewer.leave()
        # A plaintext client cannot talk to the TLS port...
        async with grpc.aio.insecure_channel(server.address) as plain:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(plain).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
        # ...but Kubernetes probes and `spaces drain` use the plaintext health listener.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as plain:
            reply = await health_pb2_grpc.HealthStub(plain).Check(
                health_pb2.HealthCheckRequest(service="liveness"), timeout=2
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop()


@pytest.fixture
def tls_redis(certificate: tuple[Path, Path], tmp_path: Path) -> Iterator[str]:
    cert_file, key_file = certificate
    port = free_port()
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(cert_file),
            "--tls-key-file",
            str(key_file),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--bind",
            "127.0.0.1",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert_file}&ssl_cert_reqs=required"
    finally:
        proc.kill()
        proc.wait()


async def test_the_redis_store_works_over_rediss(tls_redis: str) -> None:
    from spaces.store.redis import RedisStore

    store = RedisStore(tls_redis)
    for _ in range(50):
        try:
            await store.start()
            break
        except Exception:
            await asyncio.sleep(0.1)
    space = await store.create_space("tlsspace", "over tls", 0)
    assert (await store.get_space("tlsspace")).passthrough == space.passthrough == "over tls"
    await store.close()
    # And a whole server on it.
    server = await start_server(make_config(redis_url=tls_redis))
    admin = Admin(server.address)
    assert await admin.create_space()
    await admin.close()
    await server.stop()


async def metrics_text(port: int) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        return await response.text()


def sample(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + (labels or " ")) or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_endpoint_counts_a_join(tmp_path: Path) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    process = Process(
        ["serve"],
        {
            "SPACES_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
            "SPACES_METRICS_ADDR": f"127.0.0.1:{metrics_port}",
            "SPACES_ADMIN_KEY": ADMIN_KEY,
            "SPACES_LOG_FORMAT": "json",
            "SPACES_ICE_BIND": "127.0.0.1",
        },
        tmp_path / "serve.log",
    ).start()
    address = f"127.0.0.1:{grpc_port}"
    try:
        await wait_serving(address, timeout=30)
        before = await metrics_text(metrics_port)
        assert sample(before, "spaces_joins_total", '{result="ok"}') == 0
        admin = Admin(address)
        tenant = Tenant(await admin.create_key())
        space_id = await admin.create_space()
        participant = sdk.Space(tenant.token(space_id, "counted"), address)
        await participant.join()
        after = await metrics_text(metrics_port)
        assert sample(after, "spaces_joins_total", '{result="ok"}') == 1
        assert sample(after, "spaces_join_latency_seconds_count") == 1
        assert sample(after, "spaces_media_sessions") == 1
        assert sample(after, "spaces_spaces_created_total") == 1
        await participant.leave()
        await admin.close()
        await asyncio.sleep(0.3)
    finally:
        process.stop()
    # JSON logs: one object per line, and the lines about this participant carry its ids.
    lines = [json.loads(line) for line in process.log().splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    about = [line for line in lines if line.get("connection_id")]
    assert about, "no log line carried a connection id"
    assert any(line.get("space_id") == space_id and line.get("node_id") for line in about), about
