"""The error handlers on their own (no engine): a bug in a handler is a 500 error JSON that
leaves the connection usable."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from shardserve.server.errors import APIError, install_error_handlers


def test_an_unexpected_exception_is_a_500_and_is_not_reraised():
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("a bug")

    @app.get("/bad")
    async def bad() -> None:
        raise APIError(400, "bad field", param="x")

    # TestClient re-raises what escapes the app, as uvicorn then closes the connection (the
    # client's next request on it, already sent, fails with a connection reset).
    with TestClient(app) as client:
        r = client.get("/bug")
        assert r.status_code == 500
        assert r.json() == {"error": {"message": "Internal server error (RuntimeError); see the "
                                                 "server log.", "type": "internal_error",
                                      "param": None, "code": "internal_error"}}
        r = client.get("/bad")
        assert r.status_code == 400 and r.json()["error"]["param"] == "x"
