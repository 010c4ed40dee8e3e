#!/bin/sh
# Inside scripts/test-host's VM (started by netstack-test-host.service, see
# tests/host/build-image.sh): put the project at HEAD (the input disk) in place of the
# image's copy, keeping the venv scripts/setup.sh made; run tests/host; write the results
# to the output disk as a tar (no filesystem to mount on either side); the service's
# SuccessAction/FailureAction powers the VM off.
# Several boots (tests/host/conftest.py): when the tests of this boot ask for a later one
# (STATE/request-boot), this boot's results are kept in STATE/boot-N on the root, the VM
# reboots (cleanly; scripts/test-host starts qemu again on the same overlay of the image),
# this runner runs again on the next boot (its unit is enabled) and the last boot
# writes every boot's results: pytest.log one after the other, junit.xml merged, rc the
# first non-zero. A boot nobody asked for ends the run.
set -u
in=/run/nst-in/netstack
out=/run/nst-out
state=/var/lib/netstack-test-host
mkdir -p "$out"
say() { echo "NETSTACK-TEST-HOST: $*" >/dev/ttyS0; }
boot=1
if [ -s "$state/boot" ]; then
  boot=$(cat "$state/boot"); rm -f "$state/boot"
elif [ -d "$state" ]; then
  boot=0  # the VM rebooted without being asked to
fi
say "runner started after $(cut -d' ' -f1 /proc/uptime) s of uptime (boot $boot)"
cd /opt/netstack
# on the first boot only: on a later one units started at boot run this copy already (a
# replacement under them failed netstack-sd.service with "No module named 'netstack'")
if [ "$boot" = 1 ]; then
  find . -mindepth 1 -maxdepth 1 ! -name .venv ! -name '*.egg-info' -exec rm -rf {} +
  cp -a "$in"/. /opt/netstack/
  .venv/bin/python -m compileall -q netstack >/dev/null
fi
set --  # scripts/test-host's pytest arguments, one a line
while IFS= read -r a; do [ -z "$a" ] || set -- "$@" "$a"; done <"$in/tests/host/.args"
export NETSTACK_TEST_HOST=1 NETSTACK_TEST_HOST_OUT="$out" NETSTACK_REQUIRE_ROOT=1 PYTHONUNBUFFERED=1
# scripts/test-host's NETSTACK_TEST_HOST_PASS: NAME=VALUE lines, taken as they are
if [ -s "$in/tests/host/.env" ]; then
  while IFS= read -r kv; do
    case "$kv" in NETSTACK_*=*) export "$kv" ;; esac
  done <"$in/tests/host/.env"
fi
export NETSTACK_TEST_HOST_BOOT="$boot" NETSTACK_TEST_HOST_STATE="$state"
mkdir -p "$state"
rm -f "$state/request-boot"
t0=$(cut -d' ' -f1 /proc/uptime)
if [ "$boot" = 0 ]; then
  echo "test-host: the VM rebooted without a test asking for it (a panic?); see" \
    "journal-boot-*.txt and console.log" >"$out/pytest.log"
  echo 3 >"$out/rc"
else
  .venv/bin/python -m pytest -p no:cacheprovider -rA --junitxml="$out/junit.xml" \
    tests/host "$@" >"$out/pytest.log" 2>&1
  echo $? >"$out/rc"
fi
t1=$(cut -d' ' -f1 /proc/uptime)
awk -v a="$t0" -v b="$t1" 'BEGIN { printf "uptime_at_tests_s=%.1f tests_s=%.1f\n", a, b - a }' \
  >"$out/timing"
journalctl -b --no-pager >"$out/journal.txt" 2>&1
systemd-analyze >"$out/systemd-analyze.txt" 2>&1
next=$(cat "$state/request-boot" 2>/dev/null || true)
if [ "$boot" != 0 ] && [ -n "$next" ] && [ "$next" -gt "$boot" ] && [ "$boot" -lt 5 ]; then
  rm -rf "$state/boot-$boot"; cp -a "$out" "$state/boot-$boot"
  echo "$next" >"$state/boot"
  # the boots so far on the output disk too: seen even if the next boot never comes
  (cd "$state" && tar -c -f /dev/disk/by-id/virtio-nstout boot-*)
  sync
  say "boot $boot done rc=$(cat "$out/rc"); rebooting for boot $next"
  # a clean reboot (the units under test are stopped as at any reboot); this unit's
  # SuccessAction/FailureAction would power off instead: off for this boot only (/run)
  mkdir -p /run/systemd/system/netstack-test-host.service.d
  printf '[Unit]\nSuccessAction=none\nFailureAction=none\n' \
    >/run/systemd/system/netstack-test-host.service.d/reboot.conf
  systemctl daemon-reload
  systemctl --no-block reboot
  exit 0
fi
# the last boot: every boot's results together (boot-N/ each, as it was)
if ls -d "$state"/boot-* >/dev/null 2>&1; then
  mkdir -p "$state/boot-$boot"; cp -a "$out"/. "$state/boot-$boot/"
  rm -f "$out"/*
  cp -a "$state"/boot-* "$out"/
  rc=0 timing=""
  for d in $(ls -d "$out"/boot-* | sort -t- -k2 -n); do
    n=${d##*/boot-}
    printf '==================== boot %s of the VM ====================\n' "$n" >>"$out/pytest.log"
    cat "$d/pytest.log" >>"$out/pytest.log"
    r=$(cat "$d/rc" 2>/dev/null || echo 3)
    [ "$rc" != 0 ] || rc=$r
    timing="${timing:+$timing; }boot $n: $(cat "$d/timing" 2>/dev/null)"
  done
  echo "$rc" >"$out/rc"
  echo "$timing" >"$out/timing"
  cp "$d/journal.txt" "$out/journal.txt"
  /usr/bin/python3 - "$out" <<'PY'
import glob, sys, xml.etree.ElementTree as ET
out = sys.argv[1]
top = ET.Element("testsuites")
for f in sorted(glob.glob(f"{out}/boot-*/junit.xml"), key=lambda p: int(p.split("boot-")[1].split("/")[0])):
    n = f.split("boot-")[1].split("/")[0]
    for suite in ET.parse(f).getroot().iter("testsuite"):
        suite.set("name", f"{suite.get('name', 'pytest')} (boot {n})")
        top.append(suite)
ET.ElementTree(top).write(f"{out}/junit.xml", encoding="utf-8", xml_declaration=True)
PY
fi
tar -c -C "$out" -f /dev/disk/by-id/virtio-nstout .
sync
say "done rc=$(cat "$out/rc")"
# the root is a throwaway snapshot and the results are synced: off at once (the unit's
# SuccessAction=poweroff-force did not end the VM in 60 s, docs/field-notes.md)
systemctl poweroff -ff || echo o >/proc/sysrq-trigger
