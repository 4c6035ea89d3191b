"""Free 127.0.0.1 ports for tests that must name a port before a process binds it (a
multi-node master port, a port nobody listens on). Another process can take such a port in
between; where the code under test can bind port 0 and say which it got, tests do that
instead (tests/server/conftest.launch_on_port_0)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(n: int) -> int:
    """A port p with p .. p + n - 1 all free now (a master port and the ones after it: torch's
    store and the engine's four)."""
    for _ in range(50):
        base = free_port()
        if base + n >= 65536:
            continue
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports on 127.0.0.1")
