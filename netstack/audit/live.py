"""Links, addresses and routes of each qube as the kernel has them now (pyroute2), for the
end-to-end walk: it then follows the real routing, tunnel up or down."""

from __future__ import annotations

import socket
from typing import Any

from netstack.apply import _Links


def read(namespaces: list[str]) -> dict[str, dict[str, Any]]:
    links = _Links()
    out: dict[str, dict[str, Any]] = {}
    try:
        for ns in namespaces:
            ipr = links(ns)
            names = {x["index"]: x.get_attr("IFLA_IFNAME") for x in ipr.get_links()}
            routes = []
            for fam in (socket.AF_INET, socket.AF_INET6):
                for r in ipr.get_routes(family=fam, table=254):
                    dst = r.get_attr("RTA_DST")
                    if dst is None:
                        dst = "default" if fam == socket.AF_INET else "default6"
                    else:
                        dst = f"{dst}/{r['dst_len']}"
                    oif = r.get_attr("RTA_OIF")
                    if oif in names:
                        routes.append({"dst": dst, "dev": names[oif],
                                       "via": r.get_attr("RTA_GATEWAY")})
            addrs = [{"ns": ns, "cidr": f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}",
                      "ifname": names.get(a["index"])} for a in ipr.get_addr()]
            out[ns] = {"routes": routes, "addrs": addrs, "links": sorted(names.values())}
    finally:
        links.close()
    return out
