"""``lcm serve`` against a hostile client: DNS rebinding (a Host of another site), JSON that Python's parser
rejects without a JSONDecodeError, uploads in formats beyond the documented ones, and sockets that stall before or
during a request. Every case is refused in one line, and the server stays usable."""

from __future__ import annotations

import base64
import io
import json
import socket
import time

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from starlette.websockets import WebSocketDisconnect  # noqa: E402

from lcm.models.latent_diffusion import LatentDiffusion  # noqa: E402
from lcm.serve import Engine, Limits, create_app  # noqa: E402
from lcm.serve.hosts import host_allowed, host_name  # noqa: E402
from lcm.serve.server import start_in_thread  # noqa: E402
from lcm.shipped import default_model_path  # noqa: E402
from serve_client import local_client  # noqa: E402

PROMPT = "a photo of a sneaker"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(LatentDiffusion.from_pretrained(default_model_path()))


def _refused(client, headers: dict[str, str]) -> None:
    r = client.post("/api/generate", json={"prompt": PROMPT, "steps": 1}, headers=headers)
    assert r.status_code == 403 and "\n" not in r.json()["error"], r.text
    assert client.get("/", headers=headers).status_code == 403
    with pytest.raises(WebSocketDisconnect) as err:
        with client.websocket_connect("/ws", headers=headers) as ws:
            ws.receive_json()
    assert err.value.code == 1008


def test_dns_rebinding_is_refused_on_http_and_websocket(engine):
    rebound = {"host": "evil.example:7860", "origin": "http://evil.example:7860"}
    with local_client(create_app(engine)) as client:
        _refused(client, rebound)
        _refused(client, {"host": "evil.example"})  # a script sending no Origin gets no further
        _refused(client, {"host": "localhost", "origin": "http://evil.example"})
        for host in ("localhost:7860", "127.0.0.1:7860", "[::1]:7860", "192.168.1.20"):
            assert client.get("/api/health", headers={"host": host}).status_code == 200, host
    with local_client(create_app(engine, allowed_hosts=("studio.lan",)), "studio.lan:7860") as client:
        assert client.post("/api/generate", json={"prompt": PROMPT, "steps": 1}).status_code == 200
        with client.websocket_connect("/ws", headers={"origin": "http://studio.lan:7860"}) as ws:
            assert ws.receive_json()["type"] == "ready"


def test_host_names():
    assert host_name("[::1]:80") == "::1" and host_name("LocalHost:1") == "localhost" and host_name("::1") == "::1"
    assert host_allowed("app.localhost") and host_allowed("10.0.0.7:80") and not host_allowed(None)
    assert not host_allowed("localhost.evil.example") and not host_allowed("127.0.0.1.nip.io")


HOSTILE_JSON = [
    ('{"id": 1, "prompt": "x", "seed": ' + "9" * 5000 + "}", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON (nested too deeply)"),
]


def _upload(fmt: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_hostile_json_and_undocumented_formats_get_one_line_and_the_socket_lives(engine):
    uploads = [({"id": 7, "prompt": PROMPT, "image": _upload(fmt)}, "not a readable image") for fmt in ("TIFF", "ICO")]
    uploads.append(({"id": 8, "prompt": PROMPT, "image": _upload("PPM")}, "not a readable image"))
    with local_client(create_app(engine)) as client:
        with client.websocket_connect("/ws") as ws:
            assert ws.receive_json()["type"] == "ready"
            for request, message in [*HOSTILE_JSON, *uploads]:
                ws.send_text(request if isinstance(request, str) else json.dumps(request))
                reply = ws.receive_json()
                assert reply["type"] == "error" and message in reply["message"], reply
                assert "\n" not in reply["message"]
            ws.send_json({"id": 9, "prompt": PROMPT, "steps": 2, "strength": 0.5, "image": _upload("PNG")})
            assert ws.receive_json()["type"] == "image"  # a documented format, and the socket still works
        for body, message in HOSTILE_JSON:
            r = client.post("/api/generate", content=body.encode())
            assert r.status_code == 400 and message in r.json()["error"], r.text


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
        return True  # end of stream: the server closed it
    except (TimeoutError, OSError):
        return False


def test_stalled_sockets_are_closed_and_the_server_keeps_answering(engine):
    limits = Limits(request_timeout=0.5)
    running = start_in_thread(create_app(engine, limits), limits)
    host, port = running.url.removeprefix("http://").rsplit(":", 1)
    try:
        stalled = []
        for _ in range(40):  # a head that never ends
            s = socket.create_connection((host, int(port)))
            s.sendall(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n")
            stalled.append(s)
        body = socket.create_connection((host, int(port)))  # a body that never arrives
        head = "POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n"
        body.sendall(head.encode() + b'{"prompt": ')
        with socket.create_connection((host, int(port))) as ok:
            ok.sendall(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            ok.settimeout(10)
            assert ok.recv(100).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        assert all(_closed_by_server(s, 5) for s in stalled)
        assert time.monotonic() - start < 5
        body.settimeout(5)
        reply = b""
        while chunk := body.recv(4096):  # the head and the body may come in two reads
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in reply
        for s in [*stalled, body]:
            s.close()
    finally:
        running.stop()


def test_refusals_over_the_web_name_request_fields_not_command_line_flags(engine, tmp_path):
    from lcm.models.export import export_lcm_folder
    from lcm.models.student import full_student

    teacher = engine.model
    folder = export_lcm_folder(default_model_path(), full_student(teacher.unet).eval(), teacher.scheduler_config, 50,
                               tmp_path / "lcm", {"test": True})  # fmt: skip
    image = _upload("PNG")
    cases = [
        (engine, {"prompt": PROMPT, "steps": 1, "strength": 0.6, "image": image}, "raise the strength"),
        (
            Engine(LatentDiffusion.from_pretrained(folder)),
            {"prompt": PROMPT, "steps": 8, "strength": 0.1, "image": image},
            "raise the strength or lower the steps",
        ),  # fmt: skip
        (engine, {"prompt": PROMPT, "sampler": "tcd"}, "sampler tcd is not available"),
    ]
    for model, request, message in cases:
        with local_client(create_app(model)) as client:
            r = client.post("/api/generate", json=request)
            assert r.status_code == 400 and message in r.json()["error"], r.text
            assert "--" not in r.json()["error"], r.text
