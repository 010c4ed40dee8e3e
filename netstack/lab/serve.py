"""Which lab service a supervisor's service spec runs: the HTTP and DNS services
(lab/services.py) and the offline internet's sink (lab/sink.py), by type."""

from __future__ import annotations

from typing import Any

from netstack.lab.services import serve_dns, serve_http
from netstack.lab.sink import serve


def run_service(spec: Any) -> None:
    """spec: a supervisor.ServiceSpec."""
    if spec.type == "http":
        serve_http(spec.fds["tcp"], spec.log)
    elif spec.type == "dns":
        serve_dns(spec.fds["udp"], spec.fds["tcp"], spec.zone, spec.log)
    elif spec.type == "sink":
        serve(spec.fds["tcp"], spec.fds["udp"], spec.zone["lab_dir"], spec.log)
    else:
        raise ValueError(f"unknown service type {spec.type}")
