#!/usr/bin/env bash
# System tools the test suite runs for real: Prometheus (a real server scrapes ours) and promtool (checks our
# config and alert rules), both from Debian's `prometheus` package. Idempotent: exits at once when they are there.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "[tools] need Debian's 'prometheus' package: run 'apt-get install prometheus' as root" >&2; exit 1; }
  SUDO=sudo
fi
echo "[tools] installing Debian's prometheus package (prometheus + promtool, ~25 MB) ..."
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || {
  $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
# the package may start a system service on machines with an init system; the tests start their own server
$SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
command -v prometheus >/dev/null && command -v promtool >/dev/null
echo "[tools] $(prometheus --version 2>&1 | head -1)"
