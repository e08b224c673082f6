"""Running the app with uvicorn: in the foreground (``bindkit serve``) or in a background thread (tests, benches)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port): bound before uvicorn starts, so a port in use is
    an OSError naming it, and the port is known before the first request."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # listening from now: a client that connects before uvicorn starts waits instead of failing
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def make_server(app: Starlette, max_connections: int = 256) -> uvicorn.Server:
    # a bound on open connections besides the app's own on searches: a flood of idle sockets is answered 503
    config = uvicorn.Config(app, log_level="warning", limit_concurrency=max_connections, timeout_keep_alive=5)
    return uvicorn.Server(config)


@contextlib.contextmanager
def background(app: Starlette, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30) -> Iterator[str]:
    """Serve ``app`` in a thread while the block runs; yields its base URL (``http://127.0.0.1:PORT``)."""
    sock = bind_socket(host, port)
    server = make_server(app)
    # uvicorn listens for signals only in the main thread: this one leaves them to it
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server at {url_of(sock)} did not start")
        time.sleep(0.02)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
