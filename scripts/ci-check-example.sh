#!/usr/bin/env bash
# The GitHub Actions example of docs/ci.md, step for step: leak-test a program with
# `netstack check` and keep the reports. .ci/run runs it after the suite, so the example
# is known to work on a fresh Debian/Ubuntu host. Writes into ${1:-ci-artifacts}.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-ci-artifacts}"
mkdir -p "$out"
.venv/bin/netstack check configs/vpn.toml --expect vpn \
    --junit "$out/netstack-check.xml" --html "$out/netstack-check.html" --pcaps "$out/pcaps" \
    -- curl -sS --max-time 20 https://example.org/
