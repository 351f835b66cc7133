"""The client side of the auditors' HTTP API tests (test_audit_api.py, test_findings_api.py):
one auditor and one operator bearer token, and JSON reads that check the status and the
`Cache-Control: no-store` every audit answer carries."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import orjson
from aiohttp.test_utils import TestClient

AUDITOR_TOKEN = "aud_" + secrets.token_urlsafe(32)
OPERATOR_TOKEN = "op_" + secrets.token_urlsafe(32)
AUDITOR = {"Authorization": f"Bearer {AUDITOR_TOKEN}"}
OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def get_json(client: TestClient, path: str, params: dict[str, str] | None = None,
                   status: int = 200, headers: dict[str, str] = AUDITOR) -> Any:
    """GET `path` (as the auditor by default): the answer must have `status`, and a 200 must
    carry `Cache-Control: no-store`; returns the decoded JSON body."""
    response = await client.get(path, params=params or {}, headers=headers)
    body = await response.read()
    assert response.status == status, body[:500]
    if status == 200:
        assert response.headers["Cache-Control"] == "no-store"
    return orjson.loads(body)
