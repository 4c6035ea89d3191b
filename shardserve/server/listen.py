"""The listening socket of `serve`, `router` and the data-parallel front, bound before any
model loads: a port already in use then fails in a second with a message that names the port
and the flag, not after minutes of loading with uvicorn's bare `[Errno 98]`. uvicorn serves on
the socket as given (Server.run(sockets=[...]))."""

from __future__ import annotations

import os
import socket

from shardserve.errors import InvalidRequestError

# Set by the data-parallel front for a replica it starts: the number of a listening socket
# the replica inherited. The front binds the replica's port itself and passes the socket on,
# so no other process can take the port between the front picking it and the replica binding.
INHERITED_FD_ENV = "SHARDSERVE_LISTEN_FD"


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for host:port (IPv6 when the host has a colon, as uvicorn decides).
    Raises InvalidRequestError naming --host / --port when it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As uvicorn: a restarted server may bind while old connections sit in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        if isinstance(exc, socket.gaierror):  # a host name that does not resolve
            raise InvalidRequestError(f"Cannot listen on {host}:{port}: {reason}. Give --host "
                                      "an address of this machine (0.0.0.0 for all).",
                                      "host") from None
        raise InvalidRequestError(f"Cannot listen on {host}:{port}: {reason}. Pick another "
                                  "--port, or stop what holds this one.", "port") from None
    # Listening now, not when uvicorn starts: a bound socket that does not listen yet can be
    # bound again by anyone else using SO_REUSEADDR. Connections made before uvicorn runs wait
    # in the backlog (uvicorn's size).
    sock.listen(2048)
    return sock


def serving_socket(host: str, port: int) -> socket.socket:
    """The socket `serve` listens on: the one its data-parallel front handed over, if any
    (INHERITED_FD_ENV), else a new one bound to host:port (listen_socket)."""
    fd = os.environ.pop(INHERITED_FD_ENV, None)  # popped: not for this process's children
    if fd is None:
        return listen_socket(host, port)
    sock = socket.socket(fileno=int(fd))  # family and type are read from the descriptor
    inherited = bound_port(sock)
    if port not in (0, inherited):
        sock.close()
        raise InvalidRequestError(f"{INHERITED_FD_ENV}={fd} is a socket on port {inherited}, "
                                  f"not --port {port}.", "port")
    return sock


def bound_port(sock: socket.socket) -> int:
    """The port a socket got (the kernel's pick for --port 0)."""
    return int(sock.getsockname()[1])
