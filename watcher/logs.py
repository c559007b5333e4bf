"""Logging: one JSON object per line (SPEC §9) or a console format, for our code and every library's."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, MutableMapping
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _masking(mask: Callable[[str], str]) -> structlog.types.Processor:
    def processor(_logger: object, _name: str, event: MutableMapping[str, object]) -> MutableMapping[str, object]:
        for key, value in event.items():
            if isinstance(value, str):
                event[key] = mask(value)
        return event
    return processor


def configure(log_format: str = "json", level: str = "info", stream: TextIO | None = None,
              mask: Callable[[str], str] | None = None) -> None:
    """Routes structlog and the stdlib logging module through one renderer writing to `stream`.

    `timestamp` is RFC 3339 in UTC, `level` is lower case, `event` is the message. Every string
    value of every line, ours or a library's (Apprise logs its targets), passes through `mask`.
    """
    stream = stream or sys.stdout
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]
    renderer: structlog.types.Processor
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _masking(mask or (lambda text: text)),
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # Library chatter below WARNING (urllib3 connection pools, docker-py) is noise for operators;
    # Apprise's debug and info lines also print notification URLs whole, tokens and all.
    for noisy in ("urllib3", "docker", "apprise"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
