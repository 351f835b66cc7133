#!/usr/bin/env bash
# Create .venv-og: a separate venv holding OpenGradient's SDK (`opengradient==1.1.4`), used only as
# a test oracle by tests/compat/og_oracle.py. Separate because the SDK pulls `og-x402`, whose import
# name `x402` clashes with the official x402 SDK in .venv.
#
# Idempotent: returns at once when the venv already imports the pinned SDK; a half-built venv
# (interrupted install) is rebuilt. Concurrent runs are serialised with a lock. Needs PyPI (or the
# configured mirror). Takes about 70 s on a fresh machine (2 cores), about 50 ms after.
# The venv gets its own `.gitignore` (`*`), so git ignores it without a repository change.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${OG_VENV:-$REPO_ROOT/.venv-og}"
PYTHON="${OG_VENV_PYTHON:-python3}"
OG_VERSION="1.1.4"
MARKER="$VENV/.og-sdk-$OG_VERSION"

ready() {  # the marker is written only after a successful import; this check takes ~50 ms
    [[ -f "$MARKER" ]] && "$VENV/bin/python" -c \
        "import importlib.metadata as m, sys; sys.exit(m.version('opengradient') != '$OG_VERSION')" \
        2>/dev/null
}

exec 9>"${TMPDIR:-/tmp}/facilitator-venv-og.lock"
flock 9

if ready; then
    [[ -f "$VENV/.gitignore" ]] || echo "*" > "$VENV/.gitignore"
    exit 0
fi

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
echo "*" > "$VENV/.gitignore"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "opengradient==$OG_VERSION"
"$VENV/bin/python" -c "import opengradient.client.tee_verify"
touch "$MARKER"
