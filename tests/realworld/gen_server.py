# ruff: noqa: E501, SIM115
"""Writes tests/realworld/server.nft (issue 30 fixture); JSON as for gen_router.py."""
NL = "\n"
ports = [21, 22, 25, 53, 80, 110, 143, 443, 465, 587, 993, 995, 3306, 5432, 6379, 8080, 8443, 9000, 9090, 9100]
sets = [f"  set allow_{i} {{ type ipv4_addr; flags interval; elements = {{ 192.0.2.{i*4}/30 }} }}" for i in range(18)]
sets += [f"  set deny6_{i} {{ type ipv6_addr; flags interval; elements = {{ 2001:db8:{i:x}::/48 }} }}" for i in range(6)]
rules = []
for i, p in enumerate(ports):
    src = f"ip saddr @allow_{i % 18} " if i % 2 else ""
    rules.append(f"    {src}tcp dport {p} ct state new limit rate {5+i}/minute accept" if i % 4 == 0 else f"    {src}tcp dport {p} ct state new accept")
for i in range(16):
    rules.append(f"    ip dscp {['cs1','af11','ef','cs6'][i % 4]} tcp dport {7000+i} meta mark set {i+1}")
    rules.append(f"    meta mark {i+1} ip dscp set cs0")
text = f"""table inet filter {{
{NL.join(sets)}
  chain input {{
    type filter hook input priority 0; policy drop;
    ct state invalid drop
    ct state {{ established, related }} accept
    iif "lo" accept
{NL.join(f"    ip6 saddr @deny6_{i} drop" for i in range(6))}
    icmp type echo-request limit rate 5/second accept
    icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert, echo-request }} accept
{NL.join(rules)}
    tcp dport vmap {{ {", ".join(f"{10000+i} : accept" if i % 2 else f"{10000+i} : drop" for i in range(60))} }}
    udp dport {{ 60000-61000 }} accept
    limit rate 10/second log prefix "drop " counter
  }}
  chain forward {{ type filter hook forward priority 0; policy drop; }}
  chain output {{ type filter hook output priority 0; policy accept; }}
}}
"""
open("tests/realworld/server.nft", "w").write(text)
print(text.count(NL))
