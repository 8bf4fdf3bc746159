"""A real Kubernetes control plane as local processes: etcd, kube-apiserver, kube-controller-manager.

The binaries come from tools/build_control_plane.py (built from Kubernetes' and etcd's Go modules).
:class:`ControlPlane` starts them on free loopback ports with their data in one directory:

* etcd with ``--unsafe-no-fsync`` (test data, a loaded machine);
* kube-apiserver with TLS (a CA and a serving certificate made here with ``cryptography``), real
  authentication (a static token file: ``admin`` in ``system:masters`` for the tests),
  ``--authorization-mode=Node,RBAC``, the default admission plugins, service-account signing keys
  (so the TokenRequest API issues pod tokens), ``--advertise-address`` and ``--bind-address``
  127.0.0.1, and a service CIDR that is configuration only (nothing ever routes to it; the
  ``kubernetes`` Service's endpoint reconciler is off because Endpoints may not hold loopback IPs);
* kube-controller-manager (Deployment, ReplicaSet, garbage collector, namespace, service-account
  and node-lifecycle controllers, ...) with the admin identity.

:meth:`start` returns only when ``/readyz`` answers 200; :meth:`stop` ends each process by its pid
(SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`). Logs stay in ``<dir>/logs``; :meth:`log_tails`
gives their ends for a failure message.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 30
SERVICE_CIDR = "10.96.0.0/16"  # configuration only: no address of it is ever dialled
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "outbox-test-admin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ControlPlaneError(RuntimeError):
    """The control plane did not come up; the message carries the processes' log tails."""


# --- keys and certificates -------------------------------------------------------------------------


def _private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def _certificate(
    subject: str, key: rsa.RSAPrivateKey, issuer: x509.Certificate | None, issuer_key: rsa.RSAPrivateKey
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    else:
        sans: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.DNSName("kubernetes.default.svc"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def write_pki(directory: Path) -> dict[str, Path]:
    """A CA, the API server's serving certificate, and the service-account signing key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _private_key()
    ca = _certificate("outbox-test-ca", ca_key, None, ca_key)
    server_key = _private_key()
    server = _certificate("kube-apiserver", server_key, ca, ca_key)
    sa_key = _private_key()
    files = {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM),
        "server.crt": server.public_bytes(serialization.Encoding.PEM),
        "server.key": _pem_key(server_key),
        "sa.key": _pem_key(sa_key),
        "sa.pub": sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }
    paths = {}
    for name, data in files.items():
        path = directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        paths[name] = path
    return paths


def kubeconfig_text(server: str, ca_file: Path, token: str, namespace: str = "default") -> str:
    """A kubeconfig for ``server`` that authenticates with a bearer token (kubectl, helm, clients)."""
    return (
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: outbox-test\n  cluster:\n    server: {server}\n    certificate-authority: {ca_file}\n"
        f"users:\n- name: user\n  user:\n    token: {token}\n"
        f"contexts:\n- name: outbox-test\n  context:\n    cluster: outbox-test\n    user: user\n"
        f"    namespace: {namespace}\n"
        "current-context: outbox-test\n"
    )


# --- processes -------------------------------------------------------------------------------------


@dataclass
class Process:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )

    def exited(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps the process."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(grace)

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager in ``workdir``, built from ``bin_dir``."""

    bin_dir: Path
    workdir: Path
    admin_token: str = field(default_factory=lambda: secrets.token_hex(24))
    api_port: int = field(default_factory=free_port)
    processes: list[Process] = field(default_factory=list)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "pki" / "ca.crt"

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (user ``outbox-test-admin`` in ``system:masters``)."""
        return self.workdir / "admin.kubeconfig"

    def start(self) -> None:
        """Start all three and wait until the API server's /readyz is 200; ControlPlaneError if not."""
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        pki = write_pki(self.workdir / "pki")
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f'{self.admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
        tokens.chmod(0o600)
        self.kubeconfig.write_text(kubeconfig_text(self.server, self.ca_file, self.admin_token))
        self.kubeconfig.chmod(0o600)
        etcd_port, etcd_peer_port = free_port(), free_port()
        self.processes = [
            Process("etcd", self._etcd_argv(etcd_port, etcd_peer_port), logs / "etcd.log"),
            Process("kube-apiserver", self._apiserver_argv(etcd_port, pki, tokens), logs / "kube-apiserver.log"),
            Process(
                "kube-controller-manager", self._controller_manager_argv(pki), logs / "kube-controller-manager.log"
            ),
        ]
        try:
            self.processes[0].start()
            self.processes[1].start()
            self._wait_ready(READY_TIMEOUT_S)
            self.processes[2].start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the processes in reverse order of start, each by its own pid."""
        for process in reversed(self.processes):
            process.stop()

    def log_tails(self) -> str:
        return "\n".join(f"--- {p.name} ({p.log}) ---\n{p.tail()}" for p in self.processes)

    def check_alive(self) -> None:
        dead = [f"{p.name} exited with {p.exited()}" for p in self.processes if p.exited() is not None]
        if dead:
            raise ControlPlaneError(f"{', '.join(dead)}\n{self.log_tails()}")

    # -- argv --

    def _etcd_argv(self, port: int, peer_port: int) -> list[str]:
        peer = f"http://127.0.0.1:{peer_port}"
        client = f"http://127.0.0.1:{port}"
        return [
            str(self.bin_dir / "etcd"),
            "--name=default",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]

    def _apiserver_argv(self, etcd_port: int, pki: dict[str, Path], tokens: Path) -> list[str]:
        return [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={pki['server.crt']}",
            f"--tls-private-key-file={pki['server.key']}",
            f"--client-ca-file={pki['ca.crt']}",
            f"--token-auth-file={tokens}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-key-file={pki['sa.pub']}",
            f"--service-account-signing-key-file={pki['sa.key']}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "--v=1",
        ]

    def _controller_manager_argv(self, pki: dict[str, Path]) -> list[str]:
        return [
            str(self.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            "--leader-elect=false",
            f"--service-account-private-key-file={pki['sa.key']}",
            f"--root-ca-file={pki['ca.crt']}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--profiling=false",
            "--v=1",
        ]

    # -- readiness --

    def _wait_ready(self, timeout: float) -> None:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        request = urllib.request.Request(
            f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.admin_token}"}
        )
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(request, context=context, timeout=5) as response:
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {exc.read(300)!r}"
            except (OSError, urllib.error.URLError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.5)
        raise ControlPlaneError(f"/readyz of {self.server} not 200 within {timeout}s ({last})\n{self.log_tails()}")


def environment_with_kubeconfig(kubeconfig: Path) -> dict[str, str]:
    """The current environment with $KUBECONFIG set, for kubectl and helm subprocesses."""
    env = dict(os.environ)
    env["KUBECONFIG"] = str(kubeconfig)
    with contextlib.suppress(KeyError):
        del env["KUBERNETES_SERVICE_HOST"]
    return env
