"""Serving on this machine only: the loopback address and a free port on it (launch_team_app)."""
from __future__ import annotations

import socket

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on HOST that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


__all__ = ["HOST", "free_port"]
