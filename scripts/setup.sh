#!/usr/bin/env bash
# Install everything netstack needs on a fresh Debian 12 / Ubuntu host (as root), then make
# a venv from /usr/bin/python3 that sees Debian's python3-nftables binding.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(nftables python3-nftables python3-venv iproute2 tor wireguard-tools wireguard-go
      openvpn openssl tcpdump iputils-ping socat conntrack procps psmisc curl iperf3
      util-linux bubblewrap python3-seccomp python3-cryptography python3-dnspython
      bind9-dnsutils obfs4proxy systemd dhcpcd-base dnsmasq-base wpasupplicant iw hostapd
      mmdebstrap
      git chromium
      python3-setuptools python3-wheel man-db)  # scripts/build-deb's wheel; its man pages
missing=() installed_tor=0
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  case " ${missing[*]} " in *" tor "*) installed_tor=1 ;; esac
fi
# Debian's tor package enables tor.service (which pulls in tor@default, a system Tor in the
# root namespace, outside any chain: docs/field-notes.md) and starts it at every boot.
# netstack runs its own tor processes only. When this script installed tor, that service is
# ours to switch off; a tor the user had before is theirs, left as it is.
if [ "$installed_tor" = 1 ] && command -v systemctl >/dev/null; then
  systemctl disable --quiet tor.service 2>/dev/null || true
  if systemctl is-active --quiet tor.service 2>/dev/null; then systemctl stop tor.service || true; fi
fi
# app qubes run their commands as this account when no sudo user invoked netstack
if ! getent passwd netstack-qube >/dev/null; then
  useradd --system --user-group --home-dir /nonexistent --no-create-home \
    --shell /usr/sbin/nologin netstack-qube
fi
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
# The venv's packages come from PyPI (and the editable install's build wants setuptools from
# there at every run): only when they may have changed, so that a set-up that changed nothing
# runs offline (scripts/test runs this first; the test-host VM has no network). The stamp
# is what they were installed for: pyproject.toml, this script, the interpreter, the path.
stamp=.venv/.netstack-setup
want="$( { cat pyproject.toml scripts/setup.sh; /usr/bin/python3 -VV; pwd; } | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  rm -f "$stamp"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  # compat: a plain .pth path entry; the default editable finder costs ~10 ms per command
  log=$(mktemp)
  if ! .venv/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat >"$log" 2>&1
  then
    cat "$log" >&2; rm -f "$log"; exit 1
  fi
  rm -f "$log"
  echo "$want" >"$stamp"
fi
# byte-compile our package once, as Debian does for installed Python code: each command
# then skips compiling ~200 modules (even where PYTHONDONTWRITEBYTECODE is set)
.venv/bin/python -m compileall -q netstack >/dev/null
echo "setup: ok ($(.venv/bin/python -c 'import nftables, pyroute2; print("nftables+pyroute2", pyroute2.__version__)'))"
