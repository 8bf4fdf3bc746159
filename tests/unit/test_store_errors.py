"""asyncpg's connection errors are read in one place (store.connection_error): the worker, migrate,
dead-letters and verify all tell a user the same thing, a configuration error or an outage."""

from __future__ import annotations

import asyncpg
import pytest

from outbox_worker.adapters.store import DatabaseAuthError, DatabaseUnavailableError, connection_error, dsn_error


@pytest.mark.parametrize(
    ("exc", "kind", "text"),
    [
        (asyncpg.InvalidPasswordError("password authentication failed"), DatabaseAuthError, "rejected the credentials"),
        (asyncpg.InvalidAuthorizationSpecificationError("no such role"), DatabaseAuthError, "rejected the credentials"),
        (asyncpg.InvalidCatalogNameError("database does not exist"), DatabaseAuthError, "does not exist"),
        (ConnectionRefusedError(111, "refused"), DatabaseUnavailableError, "not reachable"),
        (TimeoutError(), DatabaseUnavailableError, "did not answer in time"),
        (asyncpg.CannotConnectNowError("starting up"), DatabaseUnavailableError, "not reachable"),
        (asyncpg.TooManyConnectionsError("sorry, too many clients"), DatabaseUnavailableError, "not reachable"),
        (asyncpg.AdminShutdownError("terminating connection"), DatabaseUnavailableError, "not reachable"),
        (asyncpg.ConnectionDoesNotExistError("connection was closed"), DatabaseUnavailableError, "not reachable"),
        (asyncpg.InterfaceError("connection is closed"), DatabaseUnavailableError, "not reachable"),
        (asyncpg.InternalClientError("cannot switch to state 11"), DatabaseUnavailableError, "not reachable"),
    ],
)
def test_connection_errors_map_to_a_typed_error_naming_the_fix(exc: Exception, kind: type, text: str) -> None:
    mapped = connection_error(exc, "check --database-url")
    assert isinstance(mapped, kind)
    assert text in str(mapped)
    if kind is DatabaseAuthError:
        assert str(mapped).endswith("check --database-url")


def test_other_errors_are_not_connection_errors() -> None:
    assert connection_error(asyncpg.UndefinedTableError("relation does not exist"), "fix") is None
    assert connection_error(ValueError("x"), "fix") is None
    # What a transaction-mode pooler answers to prepared statements: retrying cannot fix it.
    assert connection_error(asyncpg.ProtocolViolationError("bind message supplies 1 parameters"), "fix") is None
    # statement_timeout or pg_cancel_backend: the server answered, it is not gone
    assert connection_error(asyncpg.QueryCanceledError("canceling statement due to statement timeout"), "fix") is None
    # asyncpg's InterfaceErrors other than a closed connection or pool: at login, no retry helps.
    assert connection_error(asyncpg.InterfaceError("unsupported authentication method requested"), "fix") is None
    # An InterfaceError, but a DSN asyncpg cannot parse: dsn_error's, a configuration error.
    assert connection_error(asyncpg.ClientConfigurationError("invalid port"), "fix") is None
    assert isinstance(dsn_error(asyncpg.ClientConfigurationError("invalid port"), "fix"), DatabaseAuthError)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://app:Pa#ssw0rd@db:5432/app",  # '#' starts a fragment: the port becomes 'Pa'
        "postgresql://app:Pa/ss?w0rd@db:5432/app",  # '/' ends the host: the query is 'w0rd@db...'
        "postgresql://app:w0rd@db:5432/app?sslmode=bogus",
    ],
)
async def test_a_dsn_asyncpg_cannot_parse_is_a_configuration_error_that_never_quotes_it(dsn: str) -> None:
    from outbox_worker.adapters.store import connect_pool

    with pytest.raises(DatabaseAuthError) as info:
        await connect_pool(dsn, size=2, timeout=1)
    assert "cannot be parsed" in str(info.value)
    assert "w0rd" not in str(info.value)
    assert "percent-encode" in str(info.value)
