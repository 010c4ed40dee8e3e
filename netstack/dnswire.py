"""DNS messages through dnspython (Debian's python3-dnspython): `up` resolves VPN endpoint
hostnames, the name watcher asks names again when their TTL runs out, the failover probe
asks the VPN's resolver, always from inside a qube's namespace and never through the host's
resolver; the lab's authoritative server parses questions with it too.

Only the socket is ours: it is made inside the namespace (a socket belongs to the namespace
it was created in), then dnspython builds, sends and reads the messages."""

from __future__ import annotations

import socket

from netstack import netns
from netstack.errors import ApplyError


def query(name: str, qtype: int = 1, qid: int | None = None) -> bytes:
    """The wire form of a query for `name` (recursion desired)."""
    import dns.message
    import dns.rdatatype

    q = dns.message.make_query(name if name.endswith(".") else name + ".",
                               dns.rdatatype.RdataType.make(qtype))
    if qid is not None:
        q.id = qid
    return q.to_wire()


def parse_question(msg: bytes) -> tuple[int, int, str, int, int]:
    """(id, flags, qname without the final dot, lower case, qtype, end offset of the
    question) of a query with exactly one question. Raises ValueError for anything else."""
    import dns.exception
    import dns.message

    try:
        m = dns.message.from_wire(msg, question_only=True)
    except (dns.exception.DNSException, UnicodeError, ValueError) as e:
        raise ValueError(f"not a DNS query: {e}") from None
    if len(m.question) != 1:
        raise ValueError("one question expected")
    q = m.question[0]
    end = 12 + len(q.name.to_wire()) + 4  # one uncompressed name, then type and class
    return m.id, int(m.flags), q.name.to_text(omit_final_dot=True).lower(), int(q.rdtype), end


def lookup_in(ns: str, server: str, name: str, port: int = 53, timeout: float = 3.0,
              tries: int = 3) -> tuple[list[str], int]:
    """(A addresses, the least TTL of them) of `name`, asking `server`:`port` from inside
    `ns`; ApplyError naming the server when there is no answer or an error."""
    import dns.exception
    import dns.message
    import dns.query
    import dns.rdatatype

    for _ in range(tries):
        # A socket (and source port) per try: the late answer to a try that timed out
        # reached the next try's query on a shared socket, and dnspython refused it ("A
        # DNS query response does not respond to the question asked": `up` failed in
        # scripts/test-host's VM on a loaded host, docs/field-notes.md)
        with netns.entered(ns):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setblocking(False)
            q = dns.message.make_query(name if name.endswith(".") else name + ".",
                                       dns.rdatatype.A)
            try:
                r = dns.query.udp(q, server, timeout=timeout / tries, port=port, sock=s)
            except dns.exception.Timeout:
                continue
            except (dns.exception.DNSException, OSError) as e:
                raise ApplyError(f"cannot resolve {name!r} via {server} (from {ns}): {e}"
                                 ) from None
        finally:
            s.close()
        addrs, ttls = [], []
        for rrset in r.answer:
            if rrset.rdtype == dns.rdatatype.A:
                addrs += [rd.address for rd in rrset]
                ttls.append(rrset.ttl)
        if r.rcode() == 0 and addrs:
            return addrs, min(ttls)
        raise ApplyError(f"cannot resolve {name!r} via {server} (from {ns}): "
                         f"rcode {r.rcode()}, {len(addrs)} addresses")
    raise ApplyError(f"cannot resolve {name!r}: no answer from {server} (from {ns})")


def resolve_in(ns: str, server: str, name: str, timeout: float = 3.0,
               tries: int = 3) -> list[str]:
    """Resolve `name` (A) by asking `server` from inside namespace `ns`."""
    return lookup_in(ns, server, name, 53, timeout, tries)[0]
