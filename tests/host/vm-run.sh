#!/bin/sh
# Inside scripts/test-host's VM (started by netstack-test-host.service, see
# tests/host/build-image.sh): put the project at HEAD (the input disk) in place of the
# image's copy, keeping the venv scripts/setup.sh made; run tests/host; write the results
# to the output disk as a tar (no filesystem to mount on either side); the service's
# SuccessAction/FailureAction powers the VM off.
set -u
in=/run/nst-in/netstack
out=/run/nst-out
mkdir -p "$out"
say() { echo "NETSTACK-TEST-HOST: $*" >/dev/ttyS0; }
say "runner started after $(cut -d' ' -f1 /proc/uptime) s of uptime"
cd /opt/netstack
find . -mindepth 1 -maxdepth 1 ! -name .venv ! -name '*.egg-info' -exec rm -rf {} +
cp -a "$in"/. /opt/netstack/
.venv/bin/python -m compileall -q netstack >/dev/null
set --  # scripts/test-host's pytest arguments, one a line
while IFS= read -r a; do [ -z "$a" ] || set -- "$@" "$a"; done <"$in/tests/host/.args"
export NETSTACK_TEST_HOST=1 NETSTACK_TEST_HOST_OUT="$out" NETSTACK_REQUIRE_ROOT=1 PYTHONUNBUFFERED=1
t0=$(cut -d' ' -f1 /proc/uptime)
.venv/bin/python -m pytest -p no:cacheprovider -rA --junitxml="$out/junit.xml" \
  tests/host "$@" >"$out/pytest.log" 2>&1
echo $? >"$out/rc"
t1=$(cut -d' ' -f1 /proc/uptime)
awk -v a="$t0" -v b="$t1" 'BEGIN { printf "uptime_at_tests_s=%.1f tests_s=%.1f\n", a, b - a }' \
  >"$out/timing"
journalctl -b --no-pager >"$out/journal.txt" 2>&1
systemd-analyze >"$out/systemd-analyze.txt" 2>&1
tar -c -C "$out" -f /dev/disk/by-id/virtio-nstout .
sync
say "done rc=$(cat "$out/rc")"
# the root is a throwaway snapshot and the results are synced: off at once (the unit's
# SuccessAction=poweroff-force did not end the VM in 60 s, docs/field-notes.md)
systemctl poweroff -ff || echo o >/proc/sysrq-trigger
