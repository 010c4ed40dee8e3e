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
      git chromium)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts a tor service on install; netstack runs its own tor processes only.
if command -v systemctl >/dev/null && systemctl is-active --quiet tor 2>/dev/null; then
  systemctl stop tor || true
fi
# app qubes run their commands as this account when no sudo user invoked netstack
if ! getent passwd netstack-qube >/dev/null; then
  useradd --system --user-group --home-dir /nonexistent --no-create-home \
    --shell /usr/sbin/nologin netstack-qube
fi
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
# compat: a plain .pth path entry; the default editable finder costs ~10 ms per command
log=$(mktemp)
if ! .venv/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat >"$log" 2>&1
then
  cat "$log" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"
# byte-compile our package once, as Debian does for installed Python code: each command
# then skips compiling ~200 modules (even where PYTHONDONTWRITEBYTECODE is set)
.venv/bin/python -m compileall -q netstack >/dev/null
echo "setup: ok ($(.venv/bin/python -c 'import nftables, pyroute2; print("nftables+pyroute2", pyroute2.__version__)'))"
