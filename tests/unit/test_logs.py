"""Log configuration (watcher.logs): what reaches the JSON log at each level."""

from __future__ import annotations

import io
import json
import logging

import structlog

from watcher.logs import configure


def test_debug_level_keeps_apprise_chatter_with_its_urls_out() -> None:
    # Apprise's own debug lines print notification URLs whole (tokens in the path are short enough
    # to escape the masker's path-token rule): at WATCHER_LOG_LEVEL=debug they must still stay out.
    stream = io.StringIO()
    configure("json", "debug", stream=stream)
    try:
        logging.getLogger("apprise").debug("JSON POST URL: http://hooks.example/hook/TOKENabc123")
        logging.getLogger("apprise").info("Sent JSON notification to http://hooks.example/hook/TOKENabc123")
        logging.getLogger("apprise").warning("Failed to send JSON notification")
        structlog.get_logger("watcher.test").debug("our_own_debug_line")
    finally:
        configure("json", "info", stream=io.StringIO())
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert "TOKENabc123" not in stream.getvalue()
    assert [line["event"] for line in lines] == ["Failed to send JSON notification", "our_own_debug_line"]
