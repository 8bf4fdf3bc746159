"""asyncpg's connection errors are read in one place (store.connection_error): the worker, migrate,
dead-letters and verify all tell a user the same thing, a configuration error or an outage."""

from __future__ import annotations

import asyncpg
import pytest

from outbox_worker.adapters.store import DatabaseAuthError, DatabaseUnavailableError, connection_error


@pytest.mark.parametrize(
    ("exc", "kind", "text"),
    [
        (asyncpg.InvalidPasswordError("password authentication failed"), DatabaseAuthError, "rejected the credentials"),
        (asyncpg.InvalidAuthorizationSpecificationError("no such role"), DatabaseAuthError, "rejected the credentials"),
        (asyncpg.InvalidCatalogNameError("database does not exist"), DatabaseAuthError, "does not exist"),
        (ConnectionRefusedError(111, "refused"), DatabaseUnavailableError, "not reachable"),
        (TimeoutError(), DatabaseUnavailableError, "not reachable"),
        (asyncpg.CannotConnectNowError("starting up"), DatabaseUnavailableError, "not reachable"),
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
