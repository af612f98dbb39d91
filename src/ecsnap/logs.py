"""Log lines that stay lines: whatever a message carries (a user's name, an error text that
quotes a request), its control characters are escaped, so no value can end a log line or
forge the next one. Tracebacks, which ecsnap itself writes, keep their lines."""

from __future__ import annotations

import logging
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class OneLineFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.getMessage())
        return super().formatMessage(record)


def configure(level: int = logging.INFO) -> None:
    """The process's log: one line per record on stderr, time, level, logger, message."""
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
