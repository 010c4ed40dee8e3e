"""nftables rulesets as JSON data: built by pure functions, applied atomically per namespace."""
