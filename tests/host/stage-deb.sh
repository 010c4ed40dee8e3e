#!/usr/bin/env bash
# scripts/test-host's inputs for tests/host/test_deb.py, put in the VM's input tar under
# netstack/tests/host/.deb/: the Debian package built on this host from the project at
# HEAD (scripts/build-deb, from the tar's copy), and in deps/ the Debian packages it
# depends on that the image has not (the image has what scripts/setup.sh installs; these
# come from Debian's archive once and are kept in CACHE_DIR, so a cached run needs no
# network). tests/unit/test_deb.py checks DEPS against build-deb's Depends and setup.sh.
#   tests/host/stage-deb.sh PROJECT_DIR WORK_DIR CACHE_DIR
set -euo pipefail
root=$1 work=$2 cache=$3
DEPS=(python3-stem python3-scapy python3-prometheus-client python3-decorator)
dest="$work/args/netstack/tests/host/.deb"
rm -rf "$dest" "$work/debsrc"
mkdir -p "$dest/deps" "$work/debsrc" "$cache"
tar -x -f "$work/in.tar" -C "$work/debsrc" netstack
"$root/scripts/build-deb" --source "$work/debsrc/netstack" --python "$root/.venv/bin/python" \
  --out "$dest" --version "$(sed -n 's/^version = "\(.*\)"/\1/p' "$work/debsrc/netstack/pyproject.toml")+git$(git -C "$root" rev-parse --short=10 HEAD)"
rm -rf "$work/debsrc"
cd "$cache"
for p in "${DEPS[@]}"; do
  ls "${p}"_*.deb >/dev/null 2>&1 && continue
  apt-get download -q "$p" || { apt-get update -qq && apt-get download -q "$p"; }
done
for p in "${DEPS[@]}"; do cp "$(ls -t "${p}"_*.deb | head -n 1)" "$dest/deps/"; done
ls -l "$dest" "$dest/deps"
