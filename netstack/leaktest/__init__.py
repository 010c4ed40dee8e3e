"""`netstack leaktest`: a hostile workstation's probe battery, captured on every link."""

SCENARIOS = ("steady", "vpn-killed", "tor-killed", "firewall-reload", "down")
