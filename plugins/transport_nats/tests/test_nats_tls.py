"""TLS: a real nats-server with a certificate from a throwaway CA made by the openssl CLI."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import anyio
import pytest

from lmcache_core.errors import TransportError
from lmcache_core.testing import running_nats_server
from lmcache_transport_nats import NatsSettings, connect

pytestmark = pytest.mark.anyio


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(directory: Path, name: str, ca: str, extensions: str) -> None:
    """``name.key``/``name.pem``: a P-256 key and a certificate signed by ``ca``."""
    (directory / f"{name}.ext").write_text(extensions)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "1", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
             cwd=directory)  # fmt: skip


def _make_ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and an unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.fail("these tests need the openssl command-line tool on PATH", pytrace=False)
    directory = tmp_path_factory.mktemp("pki")
    _make_ca(directory, "ca")
    _make_ca(directory, "other-ca")
    _issue(directory, "server", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _issue(directory, "client", "ca", "extendedKeyUsage=clientAuth\n")
    return directory


def _tls_args(pki: Path, verify_clients: bool = False) -> list[str]:
    args = ["--tls", "--tlscert", str(pki / "server.pem"), "--tlskey", str(pki / "server.key")]
    if verify_clients:
        args += ["--tlsverify", "--tlscacert", str(pki / "ca.pem")]
    return args


async def test_tls_url_connects_when_the_ca_file_trusts_the_server(pki):
    with running_nats_server(args=_tls_args(pki)) as server:
        url = f"tls://127.0.0.1:{server.port}"
        async with await connect(NatsSettings(nats_tls_ca_file=pki / "ca.pem"), url) as bus:

            async def echo(message) -> None:
                await message.respond(message.payload)

            await bus.subscribe("echo", echo)
            assert await bus.request("echo", b"secret", timeout=5) == b"secret"

        start = anyio.current_time()
        with pytest.raises(TransportError, match="refused.*TLS"):
            await connect(NatsSettings(nats_tls_ca_file=pki / "other-ca.pem"), url)
        assert anyio.current_time() - start < 1.5  # an untrusted certificate is not retried


async def test_mutual_tls_needs_the_client_certificate(pki):
    with running_nats_server(args=_tls_args(pki, verify_clients=True)) as server:
        url = f"tls://127.0.0.1:{server.port}"
        with pytest.raises(TransportError, match="refused") as info:
            await connect(
                NatsSettings(nats_tls_ca_file=pki / "ca.pem", nats_connect_timeout=1), url
            )
        assert "CERTIFICATE_REQUIRED" in str(info.value)
        settings = NatsSettings(
            nats_tls_ca_file=pki / "ca.pem",
            nats_tls_cert_file=pki / "client.pem",
            nats_tls_key_file=pki / "client.key",
        )
        async with await connect(settings, url) as bus:
            assert bus.is_connected


async def test_unreadable_tls_file_is_reported_before_dialing(tmp_path, nats_url):
    with pytest.raises(TransportError, match="TLS files"):
        await connect(NatsSettings(nats_tls_ca_file=tmp_path / "missing.pem"), nats_url)
