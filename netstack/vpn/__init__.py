"""VPN ProxyVM: provider-file parsers, daemon specs and the kill switch."""
