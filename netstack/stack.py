"""Stack-level operations the CLI calls: up, down, status, exec."""

from __future__ import annotations

import contextlib
import os
import pwd
import tempfile
from pathlib import Path
from typing import Any

from netstack import apply, config, names, netns, plan
from netstack.errors import NetstackError, StateError, UsageError
from netstack.lab import vpnserver
from netstack.lab.vpnserver import LabVpn
from netstack.state import State, proc_alive

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tor-over-vpn.toml"


def build_plan(config_path: str | None, stack: str, uplink: plan.UplinkSpec,
               lab: LabVpn | None = None) -> plan.Plan:
    names.check_stack(stack)
    topo = config.load(config_path or DEFAULT_CONFIG)
    host_resolv = ""
    if uplink.mode != "lab":
        with contextlib.suppress(OSError):
            host_resolv = Path("/etc/resolv.conf").read_text()
    return plan.build(topo, stack, uplink, host_resolv, lab)


def plan_only(config_path: str | None, stack: str, uplink: plan.UplinkSpec) -> plan.Plan:
    """What `up` would make; the lab's throwaway keys go to a temporary directory."""
    config.load(config_path or DEFAULT_CONFIG)  # validate before anything else
    if uplink.mode != "lab":
        return build_plan(config_path, stack, uplink)
    with tempfile.TemporaryDirectory() as d:
        return build_plan(config_path, stack, uplink,
                          vpnserver.generate(d, stack, _wants_tor(config_path)))


def _wants_tor(config_path: str | None) -> bool:
    return any(q.kind == "tor" for q in config.load(config_path or DEFAULT_CONFIG).qubes)


def up(config_path: str | None, stack: str, uplink: plan.UplinkSpec) -> tuple[plan.Plan, str]:
    """Validate everything first (an invalid config changes nothing), then apply. A stack
    left half-made by a crash is removed first (repair); a running one is reported."""
    names.check_stack(stack)
    config.load(config_path or DEFAULT_CONFIG)  # an invalid config stops here: host untouched
    if os.geteuid() != 0:
        raise UsageError("netstack up needs root (namespaces and nftables): run it with sudo")
    note = ""
    st = State.load(stack)
    if st is not None:
        if st.data.get("status") == "up":
            raise StateError(f"stack {stack!r} is already up; run `netstack --stack {stack} "
                             "down` first, or pick another --stack")
        problems = apply.down(st)
        if problems:
            raise StateError(f"stack {stack!r} was half made and could not be cleaned: "
                             + "; ".join(problems))
        note = f"repaired: removed what an interrupted `up` of stack {stack!r} had left"
    st = State(stack)
    try:
        if uplink.mode == "lab":
            from netstack.state import _make_stack_dir

            _make_stack_dir(st.dir)
            lab = vpnserver.generate(os.path.join(st.dir, "lab"), stack, _wants_tor(config_path))
        else:
            lab = None
        p = build_plan(config_path, stack, uplink, lab)
    except BaseException:
        st.remove()  # only the lab's throwaway keys were made so far
        raise
    try:
        apply.up(p, st, str(config_path or DEFAULT_CONFIG))
    except BaseException:
        if not os.path.exists(st.path):  # refused before anything was recorded
            st.remove()
        raise
    return p, note


def down(stack: str) -> list[str]:
    st = State.load(stack)
    if st is None:
        raise StateError(f"stack {stack!r} is not up (no state in /run/netstack/{stack})")
    return apply.down(st)


def _require(stack: str) -> State:
    st = State.load(stack)
    if st is None:
        raise StateError(f"stack {stack!r} is not up; start it with `netstack --stack {stack} "
                         "up --lab`")
    return st


def status(stack: str) -> dict[str, Any]:
    """Recorded plan plus live facts read from each namespace."""
    st = _require(stack)
    p = st.data.get("plan") or {}
    out: dict[str, Any] = {"stack": stack, "status": st.data.get("status"),
                           "config": st.data.get("config"), "uplink": p.get("uplink"),
                           "qubes": []}
    links = apply._Links()
    try:
        for q in p.get("qubes", []):
            entry = {k: q[k] for k in ("name", "kind", "netvm", "label", "netns")}
            entry["addresses"] = [a for a in (q["ipv4"], q.get("ipv6")) if a]
            entry["gateway"] = q["gateway"]
            entry["interfaces"] = _live_links(links, q["netns"])
            entry["running"] = netns.exists(q["netns"])
            out["qubes"].append(entry)
        if p.get("lab"):
            lab = dict(p["lab"])
            lab["capture"] = {"isp_link": lab["isp_link"]}
            out["lab"] = lab
    finally:
        links.close()
    children = {c.get("name"): {**c, "alive": proc_alive(c["pid"], c.get("start"))}
                for c in apply.recorded_children(st)}
    from netstack.vpn.health import health

    for v in p.get("vpns", []):
        q = next(x for x in out["qubes"] if x["name"] == v["qube"])
        q["vpn"] = health(v, q["interfaces"], children.get(f"vpn-{v['qube']}"),
                          (st.data.get("vpn_resolved") or {}).get(v["qube"]))
    for t in p.get("tors", []):
        q = next(x for x in out["qubes"] if x["name"] == t["qube"])
        try:
            from netstack.tor.control import status as tor_status

            q["tor"] = tor_status(t["control_socket"])
        except NetstackError as e:
            q["tor"] = {"error": str(e), "bootstrap": None}
        q["tor"]["restarts"] = (children.get(f"tor-{t['qube']}") or {}).get("restarts")
    sup = [o for o in st.objects if o["type"] == "process"]
    out["processes"] = [{"name": o["name"], "pid": o["pid"],
                         "alive": proc_alive(o["pid"], o.get("start"))} for o in sup]
    out["processes"] += [{"name": c.get("name", "?"), "pid": c["pid"],
                          "alive": proc_alive(c["pid"], c.get("start")),
                          "restarts": c.get("restarts", 0)}
                         for c in apply.recorded_children(st)]
    return out


def _live_links(links: apply._Links, ns: str) -> list[dict[str, Any]]:
    if not netns.exists(ns):
        return []
    ipr = links(ns)
    res = []
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME")
        if name == "lo":
            continue
        addrs = [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                 for a in ipr.get_addr(index=link["index"])]
        stats = link.get_attr("IFLA_STATS64") or {}
        res.append({"name": name, "state": link.get_attr("IFLA_OPERSTATE"),
                    "addresses": addrs, "rx_bytes": stats.get("rx_bytes"),
                    "tx_bytes": stats.get("tx_bytes")})
    return res


def tor_of(stack: str, qube: str | None) -> dict[str, Any]:
    st = _require(stack)
    tors = (st.data.get("plan") or {}).get("tors", [])
    if not tors:
        raise UsageError(f"stack {stack!r} has no tor qube")
    if qube is None:
        if len(tors) > 1:
            raise UsageError("several tor qubes: name one with --qube "
                             + ", ".join(t["qube"] for t in tors))
        return tors[0]
    for t in tors:
        if t["qube"] == qube:
            return t
    raise UsageError(f"--qube {qube!r} is not a tor qube of stack {stack!r}")


def exec_argv(stack: str, qube: str, user: str | None, cmd: list[str]) -> list[str]:
    """`ip netns exec` also bind-mounts /etc/netns/NS/{resolv,nsswitch}.conf over /etc, so
    name lookups inside never use the host's resolver stubs."""
    st = _require(stack)
    qubes = {q["name"]: q for q in (st.data.get("plan") or {}).get("qubes", [])}
    if qube not in qubes:
        raise UsageError(f"no qube {qube!r} in stack {stack!r}; qubes: "
                         + ", ".join(sorted(qubes)))
    if not cmd:
        raise UsageError("exec: give a command after --, e.g. netstack exec work -- curl ...")
    ns = qubes[qube]["netns"]
    if not netns.exists(ns):
        raise StateError(f"qube {qube!r}: namespace {ns} is gone; run `netstack down` and `up`")
    argv = ["ip", "netns", "exec", ns]
    if user is None:
        user = os.environ.get("SUDO_USER") or None
    if user and user != "root":
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise UsageError(f"--user {user!r}: no such user") from None
        argv += ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
                 "--"]
    return argv + cmd
