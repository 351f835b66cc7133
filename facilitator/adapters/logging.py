"""Structured JSON logs with the request id on every line, and secret redaction.

Guarantees: every record carries `request_id` (from the HTTP request being served, via a
context variable; "-" outside requests); registered secret values (signer key, database URL, RPC
URLs) are replaced by "***" in messages and exception text before anything is written.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterable

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class _Redactor:
    def __init__(self) -> None:
        self.secrets: tuple[str, ...] = ()

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret and secret in text:
                text = text.replace(secret, "***")
        return text


REDACTOR = _Redactor()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": request_id_var.get(),
            "msg": REDACTOR.scrub(record.getMessage()),
        }
        if record.exc_info:
            entry["exc"] = REDACTOR.scrub(self.formatException(record.exc_info))
        return json.dumps(entry, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.request_id = request_id_var.get()
        return REDACTOR.scrub(super().format(record))


def configure_logging(level: str, fmt: str, secrets: Iterable[str] = ()) -> None:
    REDACTOR.secrets = tuple(s for s in secrets if s)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
