"""`facilitator devnet` with a supplied DATABASE_URL never writes (manifest file) or prints (the
manifest is what `facilitator devnet` prints) its password; the devnet's own private-cluster DSN
has none and is kept as is."""

from __future__ import annotations

import json
from urllib.parse import urlsplit, urlunsplit

import pytest

from facilitator.devnet.anvil import free_port
from facilitator.devnet.run import Devnet, redacted_dsn

PASSWORD = "Sup3r-S3cret-Pw"


@pytest.mark.parametrize(("dsn", "shown"), [
    ("postgresql://postgres@127.0.0.1:5432/facilitator_devnet",
     "postgresql://postgres@127.0.0.1:5432/facilitator_devnet"),
    (f"postgresql://app:{PASSWORD}@db.internal:5432/pay",
     "postgresql://app:***@db.internal:5432/pay"),
    (f"postgresql://app:{PASSWORD}@db.internal/pay?sslmode=require&password={PASSWORD}",
     "postgresql://app:***@db.internal/pay?sslmode=require&password=***"),
    (f"postgres://db.internal/pay?PASSWORD={PASSWORD}", "postgres://db.internal/pay?password=***"),
    ("postgresql:///pay?host=/run/postgresql", "postgresql:///pay?host=/run/postgresql"),
])
def test_redacted_dsn(dsn: str, shown: str) -> None:
    assert redacted_dsn(dsn) == shown
    assert PASSWORD not in redacted_dsn(dsn)


async def test_the_manifest_of_a_supplied_database_url_hides_its_password(database_url,
                                                                         tmp_path) -> None:
    # The test cluster trusts local connections, so a password in the URL is accepted and
    # ignored: the devnet really runs on this URL.
    parts = urlsplit(database_url)
    user, host = parts.netloc.split("@", 1)
    with_password = urlunsplit(parts._replace(netloc=f"{user}:{PASSWORD}@{host}"))
    devnet = Devnet(port=free_port(), rpc_port=free_port(), og_rpc_port=free_port(),
                    blobstore_port=free_port(), gateway_port=free_port(), directory=tmp_path,
                    database_url=with_password)
    try:
        manifest = await devnet.start()
        assert devnet.facilitator is not None
        assert devnet.facilitator.settings.database_url.reveal() == with_password  # used as is
    finally:
        await devnet.stop()
    written = (tmp_path / "manifest.json").read_text()
    assert PASSWORD not in written and PASSWORD not in json.dumps(manifest)
    assert manifest["databaseUrl"] == urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    assert json.loads(written) == manifest
