# ruff: noqa: E501, SIM115
"""Writes tests/realworld/router.nft (issue 30 fixture); its JSON is `nft -j list ruleset`
of it loaded in a scratch namespace (netstack.audit.rulesetfile.load_script)."""
NL = "\n"
Q = '"'
sets = []
for i in range(20):
    sets.append(f"  set blk4_{i} {{ type ipv4_addr; flags interval; elements = {{ 203.0.113.{i*8}/29, 198.51.100.{i}/32 }} }}")
for i in range(8):
    sets.append(f"  set svc_tcp_{i} {{ type inet_service; elements = {{ {1000+i*10}, {1001+i*10}, {2000+i} }} }}")
for i in range(6):
    sets.append(f"  set lan_hosts_{i} {{ type ipv4_addr; elements = {{ 10.0.{i}.10, 10.0.{i}.11, 10.0.{i}.12 }} }}")
for i in range(4):
    sets.append(f"  set blk6_{i} {{ type ipv6_addr; flags interval; elements = {{ 2001:db8:{i}::/48 }} }}")
dscp = ["cs0","cs1","cs2","cs3","cs4","cs5","cs6","cs7","af11","af12","af13","af21","af22","af23","af31","af32","af33","af41","af42","af43","ef"]
mangle = []
for i in range(36):
    d = dscp[i % len(dscp)]
    if i % 3 == 0:
        mangle.append(f"    ip dscp {d} meta priority set 1:{10+i} counter")
    elif i % 3 == 1:
        mangle.append(f"    udp dport {5000+i} ip dscp set {d}")
    else:
        mangle.append(f"    ip6 dscp {d} counter meta mark set {i}")
limits = []
for i, p in enumerate([22, 80, 443, 53, 123, 8080, 1194, 51820, 25]):
    proto = "udp" if p in (53, 123, 1194, 51820) else "tcp"
    limits.append(f"    iifname {Q}wan0{Q} {proto} dport {p} ct state new limit rate {10+i}/second burst 20 packets accept")
vmap_in = ", ".join(f"{p} : jump svc_{i % 4}" for i, p in enumerate(range(3000, 3030)))
blk4 = NL.join(f"    ip saddr @blk4_{i} drop" for i in range(20))
blk6 = NL.join(f"    ip6 saddr @blk6_{i} drop" for i in range(4))
svc = NL.join(f"    iifname {Q}lan0{Q} tcp dport @svc_tcp_{i} accept" for i in range(8))
fw = NL.join(f"    ip daddr @lan_hosts_{i} tcp dport {{ 80, 443 }} accept" for i in range(6))
text = f"""table inet router {{
{NL.join(sets)}
  chain svc_0 {{ ip saddr @lan_hosts_0 accept; return; }}
  chain svc_1 {{ ip saddr @lan_hosts_1 accept; return; }}
  chain svc_2 {{ ip saddr @lan_hosts_2 limit rate 5/second accept; return; }}
  chain svc_3 {{ ip saddr @lan_hosts_3 log prefix "svc3 " drop; }}
  chain mangle_pre {{
    type filter hook prerouting priority mangle; policy accept;
{NL.join(mangle)}
  }}
  chain input {{
    type filter hook input priority filter; policy drop;
    ct state vmap {{ established : accept, related : accept, invalid : drop }}
    iifname "lo" accept
{blk4}
{blk6}
    meta l4proto {{ icmp, ipv6-icmp }} limit rate 10/second accept
{NL.join(limits)}
    iifname {{ "lan0", "guest0" }} udp dport {{ 53, 67 }} accept
    iifname "lan0" tcp dport vmap {{ {vmap_in} }}
{svc}
    counter drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    ct state invalid drop
    iifname "lan0" oifname "wan0" accept
    iifname "guest0" oifname "wan0" ip daddr {{ 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 }} drop
    iifname "guest0" oifname "wan0" limit rate 1000/second accept
    iifname "wan0" oifname "lan0" ct status dnat accept
{fw}
  }}
  chain output {{ type filter hook output priority filter; policy accept; }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan0" masquerade
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "wan0" tcp dport 8443 dnat ip to 10.0.0.10:443
  }}
}}
"""
open("tests/realworld/router.nft", "w").write(text)
print(text.count(NL), "lines")
