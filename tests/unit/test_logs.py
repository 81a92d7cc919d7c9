"""shared/logs.py: the levels (libraries at WARNING whatever ALLOT_LOG_LEVEL), JSON lines, and
ALLOT_LOG_FORMAT as a typed setting."""

from __future__ import annotations

import io
import json
import logging

import pytest

from shared import logs
from shared.settings import Settings, SettingsError

DRIVERS = ("sqlalchemy.engine.Engine", "sqlalchemy.pool", "asyncpg", "aiosqlite", "urllib3")


@pytest.fixture
def configured():
    """`configure(service, level, fmt)` writing to a buffer; the logging state restored after."""
    root = logging.getLogger()
    names = [logs.SUITE_LOGGER, *logs.QUIET_LIBRARIES, *logs.INFO_LIBRARIES]
    saved = (root.level, root.handlers[:], {n: logging.getLogger(n).level for n in names})
    buffer = io.StringIO()

    def configure(level: str, fmt: str) -> io.StringIO:
        logs.configure("quota", level, fmt, stream=buffer)
        return buffer

    token = logs.request_id.set("-")
    yield configure
    logs.request_id.reset(token)
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


def emit_everything() -> None:
    for name in DRIVERS:
        logging.getLogger(name).debug("SELECT secret FROM contacts")
        logging.getLogger(name).info("BEGIN (implicit)")
    logging.getLogger("allot.quota").debug("our debug line")
    logging.getLogger("alembic.runtime.migration").info("Running upgrade  -> 0001")
    logging.getLogger("alembic.runtime.migration").debug("alembic detail")
    logging.getLogger("sqlalchemy.engine.Engine").warning("a driver warning")


def test_debug_is_ours_alone(configured):
    out = configured("DEBUG", "json")
    logs.request_id.set("req-7")
    emit_everything()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(line["logger"], line["message"]) for line in lines] == [
        ("allot.quota", "our debug line"),
        ("alembic.runtime.migration", "Running upgrade  -> 0001"),
        ("sqlalchemy.engine.Engine", "a driver warning"),
    ]
    assert "secret" not in out.getvalue()
    first = lines[0]
    assert (first["level"], first["service"], first["request_id"]) == ("DEBUG", "quota", "req-7")
    assert first["time"].endswith("+00:00")


def test_info_keeps_migrations_and_drops_debug(configured):
    out = configured("INFO", "text")
    emit_everything()
    text = out.getvalue()
    assert "our debug line" not in text and "BEGIN" not in text
    assert "INFO quota [" in text and "Running upgrade" in text
    assert "a driver warning" in text


def test_json_lines_carry_an_access_line_fields_and_tracebacks(configured):
    out = configured("INFO", "json")
    fields = {"method": "/allot.quota.v1.QuotaService/GetPackage", "code": "OK"}
    logs.access_log.info("the line\nwith a newline", extra={"fields": fields})
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("allot.errors").exception("internal error x")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # a newline in a message or a traceback stays inside its line
    access, error = (json.loads(line) for line in lines)
    assert access["method"] == fields["method"] and access["code"] == "OK"
    assert access["message"] == "the line\nwith a newline"
    assert "ValueError: boom" in error["exception"]


def test_log_format_is_a_checked_setting():
    assert Settings.from_env(environ={}).log_format == "text"
    assert Settings.from_env(environ={"ALLOT_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(SettingsError, match="ALLOT_LOG_FORMAT"):
        Settings.from_env(environ={"ALLOT_LOG_FORMAT": "xml"})


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_an_access_line_written_directly_is_the_line_logging_writes(configured, fmt, monkeypatch):
    """`logs.access` writes to the configured handler without a LogRecord; the line is the
    one logging's formatter writes for the same call and instant (the clock stopped for both),
    and with another handler added (a test's capture) the line goes through logging and
    reaches both."""
    out = configured("INFO", fmt)
    fields = {"method": "/m", "code": "OK", "duration_ms": 1.5, "request_id": "r1"}
    monkeypatch.setattr(logs.time, "time", lambda: 1_800_000_000.25)
    token = logs.request_id.set("r1")
    captured = io.StringIO()
    other = logging.StreamHandler(captured)
    try:
        logs.access("/m OK 1.5 ms", fields)
        logging.getLogger().addHandler(other)
        logs.access("/m OK 1.5 ms", fields)
    finally:
        logging.getLogger().removeHandler(other)
        logs.request_id.reset(token)
    direct, through_logging = out.getvalue().splitlines()
    assert direct == through_logging
    assert "r1" in direct and "/m OK 1.5 ms" in direct
    assert captured.getvalue() == "/m OK 1.5 ms\n"  # the other handler got it too
