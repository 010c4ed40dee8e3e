"""The built-in lab internet: hosts planned by netstack.plan, services in lab/services.py."""
