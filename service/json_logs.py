"""Log records as one JSON object per line (``service.__main__.configure_logging`` installs it
for the service, uvicorn and Python warnings, in every process of the service).

A module of its own, importing neither torch nor the web stack: the supervising parent of a
multi-process service logs through it too.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import orjson


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and every ``extra`` field."""

    _STANDARD = frozenset(
        logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys()
        | {"message", "asctime", "color_message", "taskName"}
    )

    converter = time.gmtime  # type: ignore[assignment]  # UTC timestamps

    def __init__(self) -> None:
        super().__init__()
        self._second = -1  # the whole second whose text is cached (one strftime a second)
        self._second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        entry: dict[str, Any] = {
            "ts": f"{self._second_text}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.processName not in ("MainProcess", None):
            entry["process"] = record.processName  # with several processes, which one
        for key, value in record.__dict__.items():
            if key not in self._STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        # orjson: a tenth of the standard encoder's time, for a line per request. What it cannot
        # write goes as str(); what it refuses (an integer over 64 bits) to the standard one.
        try:
            return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        except orjson.JSONEncodeError:
            return json.dumps(entry, default=str)
