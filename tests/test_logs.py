"""JSON logs: an exception is logged with its traceback as data, credentials redacted."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from canaryd.logs import configure


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure("info", json_output=True)
    stream = io.StringIO()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def test_an_exception_in_json_logs_carries_its_traceback(
    json_logs: io.StringIO,
) -> None:
    log = structlog.get_logger("canaryd.test")
    try:
        raise ValueError("event counts must be non-negative, http://ops:hunter2@prom:9090")
    except ValueError:
        log.exception("reconcile crashed", namespace="shop", name="checkout")
    line = json_logs.getvalue().strip().splitlines()[-1]
    event = json.loads(line)
    assert event["event"] == "reconcile crashed" and event["namespace"] == "shop"
    assert "exc_info" not in event
    (frame_info,) = event["exception"]
    assert frame_info["exc_type"] == "ValueError"
    assert (
        frame_info["frames"][-1]["name"] == "test_an_exception_in_json_logs_carries_its_traceback"
    )
    assert "hunter2" not in line
