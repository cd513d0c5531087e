"""Before a local server binds (lyra.web, lyra.serve): is the address reachable from the network, and
is the port free.

    from lyra.network import check_port_free, is_loopback
    is_loopback("127.0.0.1")          # True: only this machine; 0.0.0.0, a LAN address or a hostname: False
    check_port_free("127.0.0.1", 8000, key="port")   # one-line UserError, before any model loads

Anything but loopback needs a login (web) or an API key (serve): both apps ask `is_loopback` the same
question, so a page and a server bound to the same address get the same rule.
"""

from __future__ import annotations

import ipaddress
import socket

from lyra.errors import UserError


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`; a hostname or 0.0.0.0 may reach the network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int, key: str = "server_port") -> None:
    """Fail before the model loads, not after, when another server already holds the port."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(key, f"cannot listen on {host}:{port} ({error.strerror}); "
                                 f"stop the other server or pick another port") from None
