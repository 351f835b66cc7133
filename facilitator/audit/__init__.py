"""Read-only audit API and CLI over the settlement records (issue 3, §3).

- `tokens`: bearer tokens with roles (`auditor`, `operator`), configured as SHA-256 hashes;
  `require_role(...)` guards any aiohttp handler.
- `queries`: strict parsing of filters and parameterised SQL, shared by HTTP and CLI.
- `formats`: CSV / JSON Lines encoding of exported rows.
- `routes`: `add_audit_routes(app, pool, tokens)` registers the `/v1/...` endpoints.
- `cli`: `facilitator audit ...` (`add_audit_parser`, `run_audit`).
- `cli_support`: what the audit and crosscheck commands share (DATABASE_URL pool, output).

This package imports nothing from `facilitator.http` at import time of `tokens`, so the HTTP
layer may import `require_role` without an import cycle.
"""
