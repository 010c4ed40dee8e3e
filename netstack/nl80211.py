"""The few nl80211 calls that move a Wi-Fi radio between namespaces (generic netlink,
spoken directly like netstack/rtnl.py speaks rtnetlink).

Why a radio and not its netdev: a wireless netdev is bound to its namespace (the kernel
refuses `ip link set wlan0 netns X` with EINVAL); only its phy moves, with every netdev
it has (`iw phy PHY set netns`). nl80211 is per namespace too: a phy is seen, and can be
moved, only from the namespace it is in; so a socket is made inside the phy's namespace
(netns.entered) and the target is named by an fd of the other namespace
(docs/field-notes.md, "Wi-Fi (mac80211_hwsim)").
"""

from __future__ import annotations

import os
import socket
import struct

from netstack.rtnl import NetlinkError, name_attr, parse_attrs, u32_attr

NETLINK_GENERIC = 16
GENL_ID_CTRL, CTRL_CMD_GETFAMILY = 0x10, 3
CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 1, 2
NL80211_CMD_GET_INTERFACE, NL80211_CMD_GET_SCAN, NL80211_CMD_SET_WIPHY_NETNS = 5, 32, 49
NL80211_ATTR_WIPHY, NL80211_ATTR_WIPHY_NAME, NL80211_ATTR_IFINDEX = 1, 2, 3
NL80211_ATTR_BSS, NL80211_ATTR_NETNS_FD = 47, 219
NL80211_BSS_INFORMATION_ELEMENTS, NL80211_BSS_STATUS = 6, 9
BSS_STATUS_ASSOCIATED = 1
WLAN_EID_SSID = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
F_REQUEST, F_ACK, F_DUMP = 0x1, 0x4, 0x300

_HDR = struct.Struct("=IHHII")
_GENL = struct.Struct("=BBH")


class Nl80211:
    """One generic-netlink socket, in the namespace current when it was made. Raises
    NetlinkError ENOENT when the kernel has no cfg80211 (no Wi-Fi at all)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_GENERIC)
        self.sock.bind((0, 0))
        self.seq = 0
        try:
            reply = self._ask(GENL_ID_CTRL, CTRL_CMD_GETFAMILY,
                              name_attr(CTRL_ATTR_FAMILY_NAME, "nl80211"))
        except BaseException:
            self.sock.close()
            raise
        fam = reply.get(CTRL_ATTR_FAMILY_ID)
        self.family = struct.unpack_from("=H", fam)[0] if fam else 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Nl80211:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ask(self, family: int, cmd: int, body: bytes) -> dict[int, bytes]:
        """One request with an ack; the attributes of its answer ({} for a bare ack)."""
        answers = self._talk(family, cmd, body, F_REQUEST | F_ACK)
        return answers[0] if answers else {}

    def _talk(self, family: int, cmd: int, body: bytes, flags: int) -> list[dict[int, bytes]]:
        """Send one request; the attributes of every answer until its ack or dump end."""
        self.seq += 1
        seq = self.seq
        payload = _GENL.pack(cmd, 1, 0) + body
        self.sock.send(_HDR.pack(_HDR.size + len(payload), family, flags, seq, 0) + payload)
        got: list[dict[int, bytes]] = []
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + _HDR.size <= len(data):
                n, kind, _flags, mseq, _pid = _HDR.unpack_from(data, off)
                if n < _HDR.size:
                    break
                if mseq == seq:
                    if kind == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, off + _HDR.size)[0]
                        if code:
                            raise NetlinkError(code, f"nl80211 command {cmd}: "
                                               f"{os.strerror(code)}")
                        return got
                    if kind == NLMSG_DONE:
                        return got
                    body_at = off + _HDR.size + _GENL.size
                    got.append(parse_attrs(data, body_at, off + n))
                off += (n + 3) & ~3

    def wiphy(self, ifindex: int) -> int | None:
        """The wiphy index of a netdev; None: not a wireless one."""
        try:
            a = self._ask(self.family, NL80211_CMD_GET_INTERFACE,
                          u32_attr(NL80211_ATTR_IFINDEX, ifindex))
        except NetlinkError:  # ENODEV: no wireless device of that index here
            return None
        w = a.get(NL80211_ATTR_WIPHY)
        return struct.unpack_from("=I", w)[0] if w else None

    def associated_ssid(self, ifindex: int) -> str | None:
        """The SSID of the BSS the station is associated with, as `iw dev X link` finds it
        (the scan results' BSS marked associated): GET_INTERFACE on kernel 6.1 carried no
        SSID for a connected station (docs/field-notes.md, "Wi-Fi")."""
        try:
            answers = self._talk(self.family, NL80211_CMD_GET_SCAN,
                                 u32_attr(NL80211_ATTR_IFINDEX, ifindex), F_REQUEST | F_DUMP)
        except NetlinkError:
            return None
        for a in answers:
            raw = a.get(NL80211_ATTR_BSS)
            if not raw:
                continue
            bss = parse_attrs(raw, 0, len(raw))
            status = bss.get(NL80211_BSS_STATUS)
            if status is None or struct.unpack_from("=I", status)[0] != BSS_STATUS_ASSOCIATED:
                continue
            return ssid_of(bss.get(NL80211_BSS_INFORMATION_ELEMENTS, b"")) or ""
        return None

    def set_netns(self, wiphy: int, ns_fd: int) -> None:
        """Move the phy (with all its netdevs) into the namespace of `ns_fd`. Raises
        NetlinkError (ENODEV: no such phy in this namespace)."""
        self._ask(self.family, NL80211_CMD_SET_WIPHY_NETNS,
                  u32_attr(NL80211_ATTR_WIPHY, wiphy) + u32_attr(NL80211_ATTR_NETNS_FD, ns_fd))


def ssid_of(ies: bytes) -> str | None:
    """The SSID element of a run of 802.11 information elements (id, length, data)."""
    off = 0
    while off + 2 <= len(ies):
        eid, n = ies[off], ies[off + 1]
        if eid == WLAN_EID_SSID:
            return ies[off + 2:off + 2 + n].decode(errors="replace")
        off += 2 + n
    return None
