"""Logging: structlog, JSON lines, with the canary's namespace/name/step bound.

Third-party libraries' stdlib logs go through the same processors, so one stream of
JSON objects comes out of the daemon.
"""

from __future__ import annotations

import logging
import sys

import structlog

from canaryd.redact import redact_processor


def configure(level: str = "info", *, json_output: bool = True) -> None:
    """Configure structlog and the stdlib root logger (idempotent)."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # JSON lines carry the traceback as data ("exception": [...]), not "exc_info": true;
    # redaction runs last before rendering, so tracebacks are redacted too
    renderers: list[structlog.types.Processor] = (
        [
            structlog.processors.dict_tracebacks,
            redact_processor,
            structlog.processors.JSONRenderer(),
        ]
        if json_output
        else [redact_processor, structlog.dev.ConsoleRenderer()]
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderers],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
