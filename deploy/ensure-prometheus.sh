#!/bin/sh
# Make sure `prometheus` and `promtool` are on PATH (used by tests/integration/test_observability.py).
#
# Idempotent and quiet: when both commands are present it prints nothing and exits 0.
# Otherwise it installs Debian's `prometheus` package with apt-get (as root, or through sudo),
# without recommended packages (no node exporter). Debian's postinst may try to start the system
# service; the tests never use it (they run their own Prometheus on a free port).
# Exit status: 0 when both commands are available afterwards, 1 otherwise (with a message).
set -eu

have() { command -v "$1" >/dev/null 2>&1; }

if have prometheus && have promtool; then
    exit 0
fi

if ! have apt-get; then
    echo "ensure-prometheus: prometheus/promtool missing and apt-get is unavailable;" \
         "install Prometheus (>= 2.42) so that both are on PATH" >&2
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif have sudo; then
    SUDO="sudo -n"
else
    echo "ensure-prometheus: prometheus/promtool missing; run as root (or with sudo):" \
         "apt-get install --no-install-recommends prometheus" >&2
    exit 1
fi

install_pkg() {
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        prometheus >/dev/null
}

echo "ensure-prometheus: installing Debian's prometheus package" >&2
# A fresh machine may have no package lists yet (or stale ones): update only when needed.
if ! install_pkg 2>/dev/null; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    install_pkg
fi

if have prometheus && have promtool; then
    exit 0
fi
echo "ensure-prometheus: prometheus package installed but prometheus/promtool not on PATH" >&2
exit 1
