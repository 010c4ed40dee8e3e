"""Packet-level proofs: captures on links and hostile probes sent from inside a qube."""
