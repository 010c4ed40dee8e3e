"""netstack: a Qubes-OS-style chain of network namespaces with audited nftables rulesets."""

__version__ = "0.1.0"
