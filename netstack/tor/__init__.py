"""Tor: the lab's private Tor network, the Whonix-style gateway's torrc, and stem control."""
