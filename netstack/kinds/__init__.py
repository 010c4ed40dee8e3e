"""Qube kinds. Each kind is a pure spec (netstack/kinds/KIND.py: keys, validation, rules,
daemons, audit properties, leak zone) and a runtime (KIND_runtime.py: prepare, activate,
wait, health, status), registered in registry.py. This package's own module imports
nothing: importing a spec never pulls in the runtimes."""
