#!/usr/bin/env bash
# The yardstick for `netstack up configs/basic.toml --lab` + `down`: the same namespaces,
# veths, addresses, routes, sysctls, resolv.conf/nsswitch.conf files and nftables rulesets,
# written by hand with `ip` and `nft`, no state, no checks, no lab services.
#   sudo bench/handwritten-basic.sh up STACK RULESDIR    # RULESDIR: NS.json per namespace
#   sudo bench/handwritten-basic.sh down STACK
# (bench/cli.py writes RULESDIR from `netstack plan --json` before timing anything.)
set -euo pipefail
cmd=$1 s=$2
Q=(sys-net sys-firewall personal work)
L=(isp web dns vpn)
if [ "$cmd" = down ]; then
  for n in "${Q[@]}"; do ip netns del "nst-$s-$n"; rm -rf "/etc/netns/nst-$s-$n"; done
  for n in "${L[@]}"; do ip netns del "nsl-$s-$n"; rm -rf "/etc/netns/nsl-$s-$n"; done
  rmdir /etc/netns 2>/dev/null || true
  exit 0
fi
rules=$3
mkns() {  # NS FORWARD NAMESERVER
  ip netns add "$1"
  ip netns exec "$1" sh -c "sysctl -qw net.ipv4.ip_forward=$2 net.ipv6.conf.all.disable_ipv6=1 \
net.ipv6.conf.default.disable_ipv6=1"
  mkdir -p "/etc/netns/$1"
  echo "nameserver $3" > "/etc/netns/$1/resolv.conf"
  printf 'passwd: files\ngroup: files\nhosts: files dns\n' > "/etc/netns/$1/nsswitch.conf"
  if [ -f "$rules/$1.json" ]; then ip netns exec "$1" nft -j -f "$rules/$1.json"; fi
}
Q_FWD=(1 1 0 0)
for i in 0 1 2 3; do mkns "nst-$s-${Q[$i]}" "${Q_FWD[$i]}" 10.139.1.1; done
mkns "nsl-$s-isp" 1 198.51.100.53
mkns "nsl-$s-web" 0 198.51.100.53
mkns "nsl-$s-dns" 0 198.51.100.53
mkns "nsl-$s-vpn" 1 198.51.100.53
net=nst-$s-sys-net fw=nst-$s-sys-firewall isp=nsl-$s-isp
ip -n "$net" link add vif2 type veth peer name eth0 netns "$fw"
ip -n "$fw" link add vif3 type veth peer name eth0 netns "nst-$s-personal"
ip -n "$fw" link add vif4 type veth peer name eth0 netns "nst-$s-work"
ip -n "$isp" link add cust0 type veth peer name uplink netns "$net"
i=0
for h in web:198.51.100.80 dns:198.51.100.53 vpn:203.0.113.10; do
  n=${h%%:*} a=${h#*:}
  ip -n "$isp" link add "h$i-$n" type veth peer name eth0 netns "nsl-$s-$n"
  ip -n "$isp" addr add 198.51.100.1/32 dev "h$i-$n"
  ip -n "nsl-$s-$n" addr add "$a/32" dev eth0
  i=$((i + 1))
done
ip -n "$net" addr add 10.137.0.1/32 dev vif2
ip -n "$fw" addr add 10.137.0.2/32 dev eth0
ip -n "$fw" addr add 10.137.0.2/32 dev vif3
ip -n "$fw" addr add 10.137.0.2/32 dev vif4
ip -n "nst-$s-personal" addr add 10.137.0.3/32 dev eth0
ip -n "nst-$s-work" addr add 10.137.0.4/32 dev eth0
ip -n "$isp" addr add 192.0.2.1/24 dev cust0
ip -n "$net" addr add 192.0.2.2/24 dev uplink
for n in "${Q[@]}"; do
  for l in $(ip -n "nst-$s-$n" -o link | awk -F': ' '{print $2}' | cut -d@ -f1); do
    ip -n "nst-$s-$n" link set "$l" up
  done
done
for n in "${L[@]}"; do
  for l in $(ip -n "nsl-$s-$n" -o link | awk -F': ' '{print $2}' | cut -d@ -f1); do
    ip -n "nsl-$s-$n" link set "$l" up
  done
done
ip -n "$fw" route add 10.137.0.1/32 dev eth0 scope link
ip -n "$fw" route add default via 10.137.0.1 dev eth0 onlink
ip -n "$net" route add 10.137.0.2/32 dev vif2 scope link
for q in personal:3 work:4; do
  n=${q%%:*} id=${q#*:}
  ip -n "nst-$s-$n" route add 10.137.0.2/32 dev eth0 scope link
  ip -n "nst-$s-$n" route add default via 10.137.0.2 dev eth0 onlink
  ip -n "$fw" route add "10.137.0.$id/32" dev "vif$id" scope link
done
ip -n "$net" route add default via 192.0.2.1 dev uplink
i=0
for h in web:198.51.100.80 dns:198.51.100.53 vpn:203.0.113.10; do
  n=${h%%:*} a=${h#*:}
  ip -n "$isp" route add "$a/32" dev "h$i-$n" scope link
  ip -n "nsl-$s-$n" route add 198.51.100.1/32 dev eth0 scope link
  ip -n "nsl-$s-$n" route add default via 198.51.100.1 dev eth0
  i=$((i + 1))
done
