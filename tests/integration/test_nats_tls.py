"""TLS to nats-server: where TLS is expected (a tls:// URL, or a CA or client certificate set) the
worker connects only over TLS. nats-py on its own upgrades only when the server asks for it, so
against a server without TLS it sent CONNECT, password included, in clear. Real nats-servers, with
and without TLS, and a certificate authority of the test's own (trustme)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from pydantic import SecretStr

from outbox_common.config import NatsConfig, StreamConfig
from outbox_common.settings import StreamMode
from outbox_devkit.embedded import EmbeddedNats
from outbox_worker.adapters.publisher import JetStreamPublisher, NatsConfigError, SecureClient
from support.servers import nats_server

USER, PASSWORD = "relay", "tls-test-pw"
CONNECT_OF_USER = f'"user": "{USER}"'  # in the CONNECT line a tracing nats-server logs


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_nats(tmp_path: Path, ca: trustme.CA) -> Iterator[EmbeddedNats]:
    """A nats-server that requires TLS, its certificate for 127.0.0.1 signed by ``ca``."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "server.pem", tmp_path / "server.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    tls = ("--tls", "--tlscert", str(cert_file), "--tlskey", str(key_file))
    with nats_server(tmp_path / "tls", "--user", USER, "--pass", PASSWORD, *tls) as server:
        yield server


@pytest.fixture
def plain_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server without TLS, with the same user and password, tracing what clients send (its
    log shows each CONNECT and the user in it)."""
    with nats_server(tmp_path / "plain", "--user", USER, "--pass", PASSWORD, "-DV") as server:
        yield server


def config(url: str, ca_file: str = "") -> NatsConfig:
    return NatsConfig(servers=(url,), user=USER, password=SecretStr(PASSWORD), tls_ca_file=ca_file)


def host_port(server: EmbeddedNats) -> str:
    return server.url.split("://", 1)[1]


async def test_a_tls_server_is_connected_to_and_checked_over_tls(
    tls_nats: EmbeddedNats, ca: trustme.CA, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    for url in (f"tls://{host_port(tls_nats)}", f"nats://{host_port(tls_nats)}"):
        pub = JetStreamPublisher(config(url, str(ca_file)))
        try:
            await pub.connect(timeout=10)
            assert pub.connected
            await pub.ensure_stream(StreamConfig("TLS", StreamMode.CREATE), "tls.*.*", 60)
            nc = pub._nc
            assert isinstance(nc, SecureClient)
            assert nc._transport is not None
            assert nc._transport._io_writer.get_extra_info("ssl_object") is not None, "not over TLS"  # type: ignore[attr-defined]
        finally:
            await pub.close()


@pytest.mark.parametrize("how", ["tls:// URL", "CA file with a nats:// URL"])
async def test_a_server_without_tls_where_tls_is_expected_is_refused_before_the_password_is_sent(
    plain_nats: EmbeddedNats, ca: trustme.CA, tmp_path: Path, how: str
) -> None:
    """Anything listening where a TLS server is expected (a server whose TLS was turned off, a
    man in the middle) gets nothing: exit 3 with what to fix, not CONNECT with the password."""
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    if how == "tls:// URL":
        settings = config(f"tls://{host_port(plain_nats)}")
    else:
        settings = config(f"nats://{host_port(plain_nats)}", str(ca_file))
    pub = JetStreamPublisher(settings)
    try:
        with pytest.raises(NatsConfigError) as refused:
            await pub.connect(timeout=10)
    finally:
        await pub.close()
    assert "does not offer TLS" in str(refused.value)
    assert "nothing was sent in clear" in str(refused.value)
    assert PASSWORD not in str(refused.value)
    assert CONNECT_OF_USER not in plain_nats.log_path.read_text()  # no CONNECT reached the server


async def test_a_plain_server_with_a_plain_url_and_no_tls_settings_is_used_as_before(plain_nats: EmbeddedNats) -> None:
    pub = JetStreamPublisher(config(plain_nats.url))
    try:
        await pub.connect(timeout=10)
        assert pub.connected
    finally:
        await pub.close()
    assert CONNECT_OF_USER in plain_nats.log_path.read_text()  # what the test above sees when a CONNECT comes


async def test_verify_with_a_tls_url_refuses_a_server_without_tls(pg_dsn: str, plain_nats: EmbeddedNats) -> None:
    """`outboxctl verify --nats-url tls://user:password@...` reads the stream over TLS only: a server
    without it gets no CONNECT, and verify exits 3 saying why."""
    from test_migrate import outboxctl

    from support.relay import setup_db

    await setup_db(pg_dsn)
    url = f"tls://{USER}:{PASSWORD}@{host_port(plain_nats)}"
    refused = await outboxctl("verify", "--database-url", pg_dsn, "--nats-url", url, "--stream", "TLS")
    assert refused.code == 3, refused.err
    assert "the NATS server does not offer TLS" in refused.err
    assert PASSWORD not in refused.err + refused.out
    assert CONNECT_OF_USER not in plain_nats.log_path.read_text()
