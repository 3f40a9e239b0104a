"""A FastAPI test client that addresses ``lcm serve`` by an allowed host name (TestClient's own ``testserver`` is
refused by the server's Host check), for HTTP and WebSocket alike."""

from __future__ import annotations

from fastapi.testclient import TestClient


class _LocalClient(TestClient):
    def websocket_connect(self, url: str, *args, **kwargs):
        return super().websocket_connect(f"ws://{self.host}{url}" if url.startswith("/") else url, *args, **kwargs)


def local_client(app, host: str = "localhost") -> TestClient:
    client = _LocalClient(app, base_url=f"http://{host}")
    client.host = host
    return client
