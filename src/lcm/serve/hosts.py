"""Which ``Host`` and ``Origin`` a request to ``lcm serve`` may carry (docs/serve.md, "Who may connect").

A page of another site must not drive the server, even through DNS rebinding: there ``evil.example`` is made to
resolve to 127.0.0.1, so the browser sends ``Host: evil.example`` and ``Origin: http://evil.example`` to this
machine, and an Origin check that only compares the two passes. So the ``Host`` itself is checked against an
allow-list: ``localhost`` (and ``*.localhost``), IP addresses (a rebinding attack needs a name; an address typed in
the address bar cannot be rebound), and the names given with ``--allowed-host``. A browser's ``Origin``, when sent,
must name the same host and port. Both checks apply to every HTTP request and every WebSocket handshake.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = ["HostGuard", "host_allowed", "host_name", "is_address"]


def host_name(host: str) -> str:
    """The name or address of a ``Host`` header value, without its port (``[::1]:80`` → ``::1``), lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_address(name: str) -> bool:
    """Whether ``name`` is an IP address (``[::1]`` brackets allowed), not a name."""
    name = name.strip().strip("[]")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host: str | None, allowed: Iterable[str] = ()) -> bool:
    """Whether a request whose ``Host`` header is ``host`` may be answered (module docstring)."""
    if not host:
        return False
    name = host_name(host)
    extra = {host_name(a) for a in allowed}
    return name == "localhost" or name.endswith(".localhost") or is_address(name) or name in extra


def _refusal(headers: dict[str, str], allowed: frozenset[str]) -> str | None:
    host = headers.get("host")
    if not host_allowed(host, allowed):
        names = ", ".join(sorted(allowed)) or "none"
        return (
            f"host {host!r} is not allowed: lcm serve answers localhost and IP addresses, and the names given with "
            f"--allowed-host (now: {names})"
        )
    origin = headers.get("origin")
    if origin is not None and urlsplit(origin).netloc.lower() != host.strip().lower():
        return "cross-origin requests are refused"
    return None


class HostGuard:
    """ASGI middleware: requests and WebSocket handshakes with a ``Host`` or ``Origin`` it refuses get a one-line
    403 (``{"error": ...}``) or a refused handshake; the app behind it never sees them."""

    def __init__(self, app, allowed: Iterable[str] = ()):
        self.app, self.allowed = app, frozenset(host_name(a) for a in allowed)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        reason = _refusal(headers, self.allowed)
        if reason is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
            return
        body = json.dumps({"error": reason}).encode()
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 403, "headers": head})
        await send({"type": "http.response.body", "body": body})
