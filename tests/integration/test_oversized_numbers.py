"""Numbers in query strings that Python's `int()` cannot take (over 4300 digits, or digits that
are not ASCII such as '²' or '٣') are a 400 naming the parameter, never a 500: `GET /usage?days`
on a running facilitator and `PUT /v1/blobs?epochs` on the devnet blob store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from facilitator.devnet.blobstore import BlobStoreServer

HUGE = "1" * 5000  # int() refuses more than 4300 digits with ValueError
NOT_NUMBERS = [HUGE, "0" * 5000 + "7", "²", "٣", "７", "1e2", "+7", " 7", "-1", "0", ""]


@pytest.mark.parametrize("days", NOT_NUMBERS + ["367", "1000"],
                         ids=lambda d: d if len(d) < 8 else f"{len(d)} digits")
async def test_usage_days_out_of_reach_is_a_400(facilitator, days: str) -> None:
    response = await facilitator.http.get("/usage", params={"days": days})
    assert response.status_code == 400, response.text
    assert response.json()["field"] == "days"


@pytest.mark.parametrize("days", ["1", "7", "366"])
async def test_usage_days_in_range(facilitator, days: str) -> None:
    response = await facilitator.http.get("/usage", params={"days": days})
    assert response.status_code == 200, response.text
    assert response.json()["days"] == int(days)


@pytest.fixture
async def blob_store(tmp_path: Path) -> AsyncIterator[BlobStoreServer]:
    async with BlobStoreServer(tmp_path / "blobs") as server:
        yield server


@pytest.mark.parametrize("epochs", NOT_NUMBERS + ["1001"],
                         ids=lambda d: d if len(d) < 8 else f"{len(d)} digits")
async def test_blob_store_epochs_out_of_reach_is_a_400(blob_store: BlobStoreServer,
                                                       epochs: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{blob_store.url}/v1/blobs", params={"epochs": epochs},
                            data=b"blob") as response:
            assert response.status == 400, await response.text()
            assert "epochs" in (await response.json())["error"]
        async with http.put(f"{blob_store.url}/v1/blobs", params={"epochs": "1000"},
                            data=b"blob") as response:
            assert response.status == 200
