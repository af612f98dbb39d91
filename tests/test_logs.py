"""Log lines stay lines whatever a message carries (issue: no request can forge a log line)."""

from __future__ import annotations

import io
import logging

from ecsnap.logs import OneLineFormatter


def test_a_message_with_line_breaks_stays_one_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter("%(levelname)s %(message)s"))
    log = logging.getLogger("ecsnap.test-logs")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("task %s failed: %s", "t-1",
                    "The disk d-1\nINFO ecsnap.api forged\r\x1b[2J\u2028x")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("crash of %s", "a\nb")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == ("WARNING task t-1 failed: The disk d-1\\nINFO ecsnap.api forged"
                        "\\r\\x1b[2J\\u2028x")
    assert lines[1] == "ERROR crash of a\\nb"
    assert lines[2] == "Traceback (most recent call last):"  # ecsnap's own lines are kept
    assert lines[-1] == "ValueError: boom"
