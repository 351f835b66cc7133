"""Encoding exported settlements as CSV or JSON Lines, one batch of rows at a time.

Guarantees:
- Columns (CSV) and keys (JSON Lines) are `queries.SETTLEMENT_FIELD_NAMES`, in that order, with
  the values described in `queries` (hex, decimal strings, ISO-8601 UTC); a CSV null is an
  empty cell.
- CSV follows RFC 4180 (header row, CRLF, quoting where needed), UTF-8. A text cell that
  starts with `=`, `+`, `-`, `@`, tab or CR is prefixed with `'` so a spreadsheet does not
  execute it as a formula (OWASP "CSV injection"); only free-text columns (reason, message,
  network, ...) can start so. JSON Lines is always verbatim.
- Encoding holds one batch at a time: memory is bounded by the batch size, not the export.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any, Protocol

import orjson

from facilitator.audit.queries import EXPORT_FORMATS, SETTLEMENT_FIELD_NAMES

CONTENT_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class Encoder(Protocol):
    def header(self) -> bytes: ...

    def encode(self, rows: Sequence[Any]) -> bytes: ...


class CsvEncoder:
    def header(self) -> bytes:
        return self._lines([SETTLEMENT_FIELD_NAMES])

    def encode(self, rows: Sequence[Any]) -> bytes:
        return self._lines([_cell(v) for v in row.values()] for row in rows)

    @staticmethod
    def _lines(rows: Any) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\r\n").writerows(rows)
        return buffer.getvalue().encode("utf-8")


class JsonLinesEncoder:
    def header(self) -> bytes:
        return b""

    def encode(self, rows: Sequence[Any]) -> bytes:
        return b"".join(orjson.dumps(dict(row)) + b"\n" for row in rows)


def encoder(fmt: str) -> Encoder:
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}")
    return CsvEncoder() if fmt == "csv" else JsonLinesEncoder()


def _cell(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
