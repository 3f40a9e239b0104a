"""Running the app with uvicorn: on a socket bound before the model loads (a taken port is reported at once), in
the foreground for ``lcm serve``, or in a background thread for tests and benchmarks.

uvicorn waits for a request's head as long as the client likes; :class:`_TimedH11Protocol` closes a connection that
has not sent a complete head within ``Limits.request_timeout`` (the body's deadline is the app's), so half-open or
trickling sockets cannot pile up. Connections beyond a ceiling are answered 503 by uvicorn itself."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass

from fastapi import FastAPI

from lcm.serve.protocol import Limits

__all__ = ["RunningServer", "bind", "is_loopback", "run", "start_in_thread", "url"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: any free port), or a one-line ``ValueError``."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        raise ValueError(f"--host {host}: not an address or name this machine can listen on") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ValueError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror})") from None
    sock.set_inheritable(True)
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _protocol(timeout: float):
    """uvicorn's h11 protocol with a deadline on each request's head (module docstring)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class _TimedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_deadline = None
            self._arm()

        def _arm(self) -> None:
            self._cycle_armed = self.cycle
            self._head_deadline = self.loop.call_later(timeout, self._expire)

        def _disarm(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _expire(self) -> None:
            self._head_deadline = None
            if self.cycle is self._cycle_armed and self.transport.get_protocol() is self:  # still no new request
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not self._cycle_armed or self.transport.get_protocol() is not self:
                self._disarm()  # a request head arrived (or the socket became a WebSocket)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.get_protocol() is self and not self.transport.is_closing():
                self._disarm()
                self._arm()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return _TimedH11Protocol


def _config(app: FastAPI, limits: Limits, log_level: str):
    import uvicorn

    # A WebSocket frame holds one request: an image and a mask in base64, plus the other fields.
    return uvicorn.Config(
        app,
        log_level=log_level,
        http=_protocol(limits.request_timeout),
        ws_max_size=limits.max_request_bytes,
        limit_concurrency=8 * limits.max_connections + 32,  # open sockets (and tasks) past this get a 503
        timeout_graceful_shutdown=2,
    )


def run(app: FastAPI, limits: Limits, sock: socket.socket, log_level: str = "warning") -> None:
    """Serve ``app`` on ``sock`` until interrupted (Ctrl-C)."""
    import uvicorn

    uvicorn.Server(_config(app, limits, log_level)).run(sockets=[sock])


@dataclass
class RunningServer:
    """A server started by :func:`start_in_thread`; ``stop()`` ends it."""

    url: str
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_in_thread(app: FastAPI, limits: Limits, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Serve ``app`` from a background thread (no signal handlers there); returns once it accepts connections."""
    import uvicorn

    sock = bind(host, port)
    server = uvicorn.Server(_config(app, limits, "warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="lcm-serve")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    return RunningServer(url(sock), server, thread)
