"""The worker's event loop (OUTBOX_EVENT_LOOP): uvloop by default, asyncio on request or when uvloop
is missing (with a warning naming the setting)."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest
import uvloop

from outbox_cli.cmd_worker import run_on_loop
from outbox_common.settings import EventLoop, WorkerSettings


async def _loop_type() -> type[asyncio.AbstractEventLoop]:
    return type(asyncio.get_running_loop())


def test_the_worker_runs_on_uvloop_by_default() -> None:
    settings = WorkerSettings(database_url="postgresql://u@h/db")
    assert settings.event_loop == EventLoop.UVLOOP
    assert issubclass(run_on_loop(_loop_type(), settings.event_loop), uvloop.Loop)


def test_asyncio_runs_the_standard_loop() -> None:
    loop_type = run_on_loop(_loop_type(), EventLoop.ASYNCIO)
    assert not issubclass(loop_type, uvloop.Loop)
    assert loop_type.__module__.startswith("asyncio")


def test_without_uvloop_the_standard_loop_runs_and_a_warning_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    with caplog.at_level(logging.WARNING, logger="outbox_worker"):
        loop_type = run_on_loop(_loop_type(), EventLoop.UVLOOP)
    assert loop_type.__module__.startswith("asyncio")
    assert "OUTBOX_EVENT_LOOP=asyncio" in caplog.text


def test_an_unknown_event_loop_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match=r"uvloop.*asyncio|asyncio.*uvloop"):
        WorkerSettings(database_url="postgresql://u@h/db", event_loop="trio")  # type: ignore[arg-type]
