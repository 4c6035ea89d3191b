"""The listening socket is bound before anything loads (server/listen.py): a port in use or a
host that is not this machine's is one clear line and exit 2, before the model is touched."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from shardserve.errors import InvalidRequestError
from shardserve.server.listen import INHERITED_FD_ENV, bound_port, listen_socket, serving_socket


@pytest.fixture
def taken_port():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    yield holder.getsockname()[1]
    holder.close()


def test_port_in_use_names_the_port_and_the_flag(taken_port):
    with pytest.raises(InvalidRequestError, match=rf"127.0.0.1:{taken_port}.*--port") as info:
        listen_socket("127.0.0.1", taken_port)
    assert info.value.param == "port"


def test_unresolvable_host_names_the_flag():
    with pytest.raises(InvalidRequestError, match="--host") as info:
        listen_socket("no-such-host.invalid", 8000)
    assert info.value.param == "host"


def test_port_0_binds_a_free_port_that_is_reported():
    sock = listen_socket("127.0.0.1", 0)
    try:
        port = bound_port(sock)
        assert port > 0
        with pytest.raises(InvalidRequestError):  # it is really held
            listen_socket("127.0.0.1", port)
    finally:
        sock.close()


def test_serving_socket_takes_the_inherited_one_once(monkeypatch):
    """A data-parallel replica serves on the socket its front bound and handed over; the
    variable is consumed, so the replica's own children do not take it for theirs."""
    front = listen_socket("127.0.0.1", 0)
    port = bound_port(front)
    monkeypatch.setenv(INHERITED_FD_ENV, str(os.dup(front.fileno())))
    front.close()
    sock = serving_socket("127.0.0.1", port)
    try:
        assert bound_port(sock) == port and INHERITED_FD_ENV not in os.environ
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it listens
        with pytest.raises(InvalidRequestError):  # the next call binds anew: the port is held
            serving_socket("127.0.0.1", port)
    finally:
        sock.close()


def test_an_inherited_socket_on_another_port_is_refused(monkeypatch):
    held = listen_socket("127.0.0.1", 0)
    monkeypatch.setenv(INHERITED_FD_ENV, str(os.dup(held.fileno())))
    try:
        with pytest.raises(InvalidRequestError, match=rf"port {bound_port(held)}, not --port 1\b"):
            serving_socket("127.0.0.1", 1)
    finally:
        held.close()


@pytest.mark.parametrize("command", [
    ["serve"],
    ["serve", "--data-parallel-size", "2"],
    ["router", "--backend", "http://127.0.0.1:9"],
])
def test_cli_fails_on_a_taken_port_before_loading(taken_port, command):
    """The model would load (minutes for a big one) before uvicorn found the port taken; now
    the command stops first, and says which port and which flag."""
    proc = subprocess.run([sys.executable, "-m", "shardserve.cli", *command, "--host",
                           "127.0.0.1", "--port", str(taken_port)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: Cannot listen on 127.0.0.1:{taken_port}" in proc.stderr
    assert "loading the model" not in proc.stdout
    assert "replicas" not in proc.stdout  # no data-parallel replica was started
