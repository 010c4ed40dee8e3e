"""`net` at run time: the DHCP client's files before it starts, its lease in `status`, and
the wait for a lease."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from netstack import dhcp
from netstack.dhcp import DhcpInfo
from netstack.kernel import Kernel
from netstack.kinds.runtime import KindRuntime, LiveFacts
from netstack.model import QubeInfo

if TYPE_CHECKING:
    from netstack.reconcile import Runtime
    from netstack.state import State


class NetRuntime(KindRuntime):
    def prepare(self, q: QubeInfo, rt: Runtime) -> None:
        """The client's private lease directory, then its hook: the go signal."""
        info = q.info
        if isinstance(info, DhcpInfo):
            rt.make_dir(info.lease_dir, 0o700)
            rt.write(info.script, dhcp.script_text(info), 0o700)

    def reload_commands(self, q: QubeInfo, st: State) -> list[dict[str, Any]]:
        """A full ruleset reload empties the map: the current lease fills it again."""
        info = q.info
        if not isinstance(info, DhcpInfo) or not info.dynamic_dns:
            return []
        lease = dhcp.read_lease(info.lease_file)
        return dhcp.map_commands(lease.dns if lease and lease.bound else [])

    def status(self, q: QubeInfo, live: LiveFacts, k: Kernel) -> dict[str, Any]:
        info = q.info
        out: dict[str, Any] = {"dhcp": dhcp.status(info)} if isinstance(info, DhcpInfo) else {}
        if "wifi" in q.settings:  # the moved radio's netdev is sys-net's uplink
            dev = q.upstream_if
            out["wifi"] = {"dev": dev, "was": q.settings["wifi"],
                           "radio": k.wiphy(q.netns, dev) is not None,
                           "ssid": k.wifi_ssid(q.netns, dev)}
        url = q.settings.get("connectivity_check")
        if url and live.watching:  # its GET in clear is what the watch exists to catch
            out["connectivity"] = {"url": url, "state": "skipped", "address": None,
                                   "why": "the uplink watch is on, and the check's clear "
                                   "GET would be its alarm"}
        elif url and k.real and live.links:  # NetworkManager's check, from sys-net itself
            from netstack.addressing import VIRTUAL_DNS
            from netstack.connectivity import check

            out["connectivity"] = check(q.netns, url, VIRTUAL_DNS[0])
        return out

    def status_lines(self, entry: dict[str, Any]) -> list[str]:
        w = entry.get("wifi")
        lines = []
        c = entry.get("connectivity")
        if c:
            lines.append(f"connectivity {c['state']}: {c['why']} ({c['url']}"
                         + (f" at {c['address']}" if c.get("address") else "") + ")"
                         + (": a captive portal is in the way; log in from sys-net "
                            "(the chain stays closed until then)"
                            if c["state"] == "portal" else ""))
        if w:
            lines.append(f"wifi {w['dev']} (was {w['was']}): " + (
                "radio not in this namespace" if not w["radio"]
                else f"associated with {w['ssid']!r}" if w["ssid"]
                else "NOT ASSOCIATED: the chain is closed, nothing leaves"))
        d = entry.get("dhcp")
        if not d:
            return lines
        return lines + self._dhcp_lines(d)

    @staticmethod
    def _dhcp_lines(d: dict[str, Any]) -> list[str]:
        if not d["bound"]:
            return [f"dhcp {d['dev']}: NO LEASE (last event {d.get('reason', '-')}): the "
                    "chain is closed, nothing leaves"]
        return [f"dhcp {d['dev']}: {d['address']} via {', '.join(d['routers']) or '-'}, "
                f"dns {', '.join(d['dns']) or '-'} (lease {d['lease_s']} s, "
                f"{d['renewals']} renewals, last {d['reason']} {d['age_s']:.0f} s ago)"]

    def health(self, entry: dict[str, Any]) -> list[str]:
        out = []
        c = entry.get("connectivity")
        if c and c["state"] == "portal":
            out.append(f"a captive portal is in the way ({c['why']}): nothing of the chain "
                       "gets through until a login")
        elif c and c["state"] != "full":
            out.append(f"connectivity check failed ({c['why']}): the network does not "
                       "answer as the internet does")
        w = entry.get("wifi")
        if w and not w["ssid"]:
            out.append(f"Wi-Fi {w['dev']} is not associated: nothing leaves until it is")
        d = entry.get("dhcp")
        if d and not d["bound"]:
            out.append(f"no DHCP lease on {d['dev']} (last event {d.get('reason', '-')}): "
                       "nothing leaves until one comes")
        return out

    def wait_ready(self, q: QubeInfo, st: State, k: Kernel, timeout: float,
                   progress: Callable[[int, str], None]) -> float | None:
        info = q.info
        if not isinstance(info, DhcpInfo):
            return None
        return dhcp.wait_bound(info, timeout, progress)
