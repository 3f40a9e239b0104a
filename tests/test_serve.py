"""``lcm serve`` through FastAPI's TestClient: images, parity with :func:`lcm.sample.generate`, limits, bad input,
dropping of stale requests, and the command's flags."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from starlette.websockets import WebSocketDisconnect  # noqa: E402

import lcm.shipped  # noqa: E402
from lcm.cli import main  # noqa: E402
from lcm.images import to_uint8  # noqa: E402
from lcm.models.latent_diffusion import LatentDiffusion  # noqa: E402
from lcm.sample import Sampler, generate  # noqa: E402
from lcm.serve import Engine, Limits, create_app, serve_model_path  # noqa: E402
from lcm.serve import engine as engine_module  # noqa: E402
from lcm.serve.protocol import Request  # noqa: E402
from lcm.serve.server import is_loopback  # noqa: E402
from lcm.shipped import default_model_path  # noqa: E402
from serve_client import local_client  # noqa: E402

PROMPT = "a photo of a sneaker"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Batch-1 generations of a 32x32 model: one thread is as fast, and steady when other tests share the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    """The shipped teacher as a w-conditioned LCM folder (zero-initialised w projection; no training needed)."""
    from lcm.models.export import export_lcm_folder
    from lcm.models.student import full_student

    teacher = LatentDiffusion.from_pretrained(default_model_path(), with_text_encoder=False)
    student = full_student(teacher.unet).eval()
    out = tmp_path_factory.mktemp("serve") / "lcm"
    return export_lcm_folder(default_model_path(), student, teacher.scheduler_config, 50, out, {"test": True})


@pytest.fixture(scope="module")
def lcm_engine(lcm_folder) -> Engine:
    return Engine(LatentDiffusion.from_pretrained(lcm_folder))


@pytest.fixture(scope="module")
def teacher_engine() -> Engine:
    return Engine(LatentDiffusion.from_pretrained(default_model_path()))


def ready(ws) -> dict:
    """The message every connection opens with: model, sampler, size, defaults, limits."""
    message = ws.receive_json()
    assert message["type"] == "ready", message
    return message


def pixels(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(data_url.partition(",")[2]))) as img:
        return np.asarray(img)


def library_pixels(model, sampler, steps, w, seeds, spacing=None) -> np.ndarray:
    """What :func:`lcm.sample.generate` makes, as the uint8 greyscale the page receives."""
    with torch.no_grad():
        images = generate(model, [PROMPT] * len(seeds), sampler, steps, w, seeds, timestep_spacing=spacing)
    return to_uint8(images)[..., 0]


def png_of(size=(50, 40), mode="RGB", fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.new(mode, size, (200,) * len(mode)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


# --- images ---------------------------------------------------------------------------------------------------------


def test_http_generate_png_and_json(teacher_engine):
    with local_client(create_app(teacher_engine)) as client:
        health = client.get("/api/health").json()
        assert health["status"] == "ok" and health["sampler"] == "ddim" and health["image_size"] == [32, 32]
        assert health["limits"]["max_steps"] == 8 and health["device"] == "cpu"
        page = client.get("/")
        assert page.status_code == 200 and "/static/app.js" in page.text
        assert client.get("/static/app.js").status_code == 200

        r = client.post("/api/generate?format=png", json={"prompt": PROMPT, "steps": 2, "seed": 3})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert float(r.headers["x-generate-ms"]) > 0
        with Image.open(io.BytesIO(r.content)) as img:
            assert img.size == (32, 32) and img.mode == "L"
            png = np.asarray(img)
        r = client.post("/api/generate", json={"prompt": PROMPT, "steps": 2, "seed": 3, "batch": 2})
        body = r.json()
        assert r.status_code == 200 and body["type"] == "image" and len(body["images"]) == 2
        assert body["sampler"] == "ddim" and body["steps"] == 2 and body["ms"] > 0
        # the teacher's DDIM on trailing timesteps, as the library draws it, seed by seed
        expected = library_pixels(teacher_engine.model, Sampler.DDIM, 2, 3.0, [3, 4], spacing="trailing")
        np.testing.assert_array_equal(png, expected[0])
        np.testing.assert_array_equal(pixels(body["images"][1]), expected[1])


def test_websocket_lcm_image_equals_the_library(lcm_engine):
    with local_client(create_app(lcm_engine)) as client:
        with client.websocket_connect("/ws") as ws:
            info = ready(ws)
            assert info["sampler"] == "lcm" and info["is_lcm"] and info["image_size"] == [32, 32]
            ws.send_json({"id": 1, "prompt": PROMPT, "steps": 4, "w": 2.5, "seed": 11, "batch": 2})
            reply = ws.receive_json()
    assert reply["type"] == "image" and reply["id"] == 1 and len(reply["images"]) == 2
    expected = library_pixels(lcm_engine.model, Sampler.LCM, 4, 2.5, [11, 12])
    for got, want in zip(reply["images"], expected, strict=True):
        assert pixels(got).shape == (32, 32)
        np.testing.assert_array_equal(pixels(got), want)


def test_default_model_prefers_the_shipped_lcm(tmp_path, monkeypatch):
    assert serve_model_path() in (default_model_path(), lcm.shipped.ASSETS / "fashion-lcm")
    (tmp_path / "fashion-lcm" / "unet").mkdir(parents=True)
    monkeypatch.setattr(lcm.shipped, "ASSETS", tmp_path)
    assert serve_model_path() == tmp_path / "fashion-lcm"


def test_prompt_embeddings_come_from_the_models_prompt_cache(teacher_engine, monkeypatch):
    engine = Engine(teacher_engine.model)
    calls = []
    encode = engine.model.prompt_cache.encode
    monkeypatch.setattr(engine.model.prompt_cache, "encode", lambda p: calls.append(p) or encode(p))
    for prompt in ("a bag", "a coat", "a bag", "a bag"):  # typing re-sends a prompt with every slider move
        engine.run(Request(None, prompt, "", 1, 3.0, 0, 1))
    assert [c for c in calls if c != [""]] == [["a bag"], ["a coat"]]  # each prompt encoded once (and "" at most)
    assert calls.count([""]) <= 1


def slowed(fn, seconds: float, record: list | None = None):
    """``fn`` taking at least ``seconds``, recording how many calls overlap (the lock must keep it at 1)."""
    running = [0]
    guard = threading.Lock()

    def wrapper(*args, **kwargs):
        with guard:
            running[0] += 1
            if record is not None:
                record.append(running[0])
        try:
            time.sleep(seconds)
            return fn(*args, **kwargs)
        finally:
            with guard:
                running[0] -= 1

    return wrapper


# --- limits and bad input --------------------------------------------------------------------------------------------

BAD = [
    ({"id": 1, "prompt": PROMPT, "steps": 9}, "steps must be between 1 and 8, got 9"),
    ({"id": 2, "prompt": "x" * 301}, "prompt is too long: 301 characters, at most 300"),
    ({"id": 3, "prompt": PROMPT, "batch": 5}, "batch must be between 1 and 4, got 5"),
    ({"id": 4, "prompt": PROMPT, "w": -1}, "w must be between 0 and 30"),
    ({"id": 5, "prompt": PROMPT, "steps": "four"}, 'steps must be an integer, got "four"'),
    ({"id": 6, "prompt": PROMPT, "seed": True}, "seed must be an integer, got true"),
    ({"id": 7, "prompt": PROMPT, "colour": "red"}, "unknown field(s) 'colour'"),
    ({"id": 8, "prompt": 3}, "prompt must be a string, got 3"),
    ({"id": 9, "prompt": PROMPT, "image": base64.b64encode(b"just text").decode()}, "not a readable image"),
    ({"id": 10, "prompt": PROMPT, "image": "%%%"}, "image is not valid base64"),
    ({"id": 11, "prompt": PROMPT, "image": png_of(), "strength": 2}, "strength must be between 0 and 1"),
    ({"id": 12, "prompt": PROMPT, "mask": png_of()}, "mask needs an image"),
    ({"id": 13, "prompt": PROMPT, "image": png_of(), "mask": png_of(fmt="TIFF")}, "mask is not a readable image"),
    ({"id": 14, "prompt": PROMPT, "image": png_of(), "mask": base64.b64encode(b"text").decode()}, "mask is not a"),
    ({"id": 15, "prompt": PROMPT, "image": png_of(), "mask": "%%%"}, "mask is not valid base64"),
    ({"id": 16, "prompt": PROMPT, "image": png_of(), "mask": [1]}, "mask must be a base64 string"),
    ({"prompt": PROMPT}, "id: each request needs an integer id"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "a request must be a JSON object, got list"),
]


def test_bad_requests_get_one_line_errors_and_the_socket_lives(teacher_engine):
    with local_client(create_app(teacher_engine)) as client, client.websocket_connect("/ws") as ws:
        ready(ws)
        for request, message in BAD:
            ws.send_text(request if isinstance(request, str) else json.dumps(request))
            reply = ws.receive_json()
            assert reply["type"] == "error" and message in reply["message"], (request, reply)
            assert "\n" not in reply["message"]
            assert reply["id"] == (request.get("id") if isinstance(request, dict) else None)
        ws.send_json({"id": 99, "prompt": PROMPT, "steps": 1})
        reply = ws.receive_json()
        assert reply["type"] == "image" and reply["id"] == 99  # still usable
        # the same checks over HTTP, as 400s with one line
        r = client.post("/api/generate", content=b"{nope")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
        r = client.post("/api/generate", json={"prompt": PROMPT, "steps": 0})
        assert r.status_code == 400 and r.json()["error"] == "steps must be between 1 and 8, got 0"


def test_limits_are_configurable_and_the_rate_is_per_connection(teacher_engine, monkeypatch):
    monkeypatch.setattr(engine_module, "generate", slowed(engine_module.generate, 0.05))
    limits = Limits(max_steps=2, max_batch=1, max_prompt_chars=10, rate=5, max_upload_kb=1)
    noise = io.BytesIO()
    Image.frombytes("RGB", (64, 64), np.random.default_rng(0).bytes(64 * 64 * 3)).save(noise, format="PNG")
    big = base64.b64encode(noise.getvalue()).decode()  # about 16 KB
    with local_client(create_app(teacher_engine, limits)) as client:
        r = client.post("/api/generate", json={"prompt": "sneaker", "image": big * 8})
        assert r.status_code == 413 and r.json()["error"] == "request too large: images up to 1 KiB"
        with client.websocket_connect("/ws") as ws:
            info = ready(ws)
            assert info["limits"]["rate"] == 5 and info["limits"]["max_steps"] == 2
            ws.send_json({"id": 0, "prompt": "sneaker", "image": big})
            assert ws.receive_json()["message"] == "image is too large: at most 1 KiB"
            ws.send_json({"id": 0, "prompt": "sneaker", "image": png_of(), "mask": big})  # the same bound for masks
            assert ws.receive_json()["message"] == "mask is too large: at most 1 KiB"
            ws.send_json({"id": 0, "prompt": "sneaker", "steps": 3})
            assert ws.receive_json()["message"] == "steps must be between 1 and 2, got 3"
            for i in range(1, 13):  # a burst of 12 against a bucket of 5 (three spent above), refilling at 5/s
                ws.send_json({"id": i, "prompt": "sneaker", "steps": 1})
            replies = [ws.receive_json() for _ in range(12)]
            with client.websocket_connect("/ws") as other:  # another connection has its own bucket
                ready(other)
                other.send_json({"id": 1, "prompt": "sneaker", "steps": 1})
                assert other.receive_json()["type"] == "image"
    limited = [r for r in replies if r["type"] == "error" and r["message"].startswith("rate limit")]
    assert len(limited) >= 5 and all(r["id"] is not None for r in limited)
    assert sorted(r["id"] for r in replies) == list(range(1, 13))  # each request answered once


def test_max_connections_and_cross_origin(teacher_engine):
    with local_client(create_app(teacher_engine, Limits(max_connections=1))) as client:
        with client.websocket_connect("/ws") as first:
            ready(first)
            with client.websocket_connect("/ws") as second:
                busy = second.receive_json()
                assert busy["type"] == "error" and busy["message"].startswith("server busy")
        with pytest.raises(WebSocketDisconnect) as err:
            with client.websocket_connect("/ws", headers={"origin": "http://elsewhere.example"}) as ws:
                ws.receive_json()
        assert err.value.code == 1008
        r = client.post("/api/generate", json={"prompt": PROMPT}, headers={"origin": "http://elsewhere.example"})
        assert r.status_code == 403
        r = client.post("/api/generate", json={"prompt": PROMPT, "steps": 1}, headers={"origin": "http://localhost"})
        assert r.status_code == 200


# --- stale requests ----------------------------------------------------------------------------------------------


def test_stale_requests_are_dropped_never_queued(teacher_engine, monkeypatch):
    overlap: list[int] = []
    monkeypatch.setattr(engine_module, "generate", slowed(engine_module.generate, 0.25, overlap))
    with local_client(create_app(teacher_engine)) as client:
        hub = client.app.state.hub
        with client.websocket_connect("/ws") as a, client.websocket_connect("/ws") as b:
            ready(a), ready(b)
            for i in range(1, 21):  # typing much faster than the generator
                a.send_json({"id": i, "prompt": PROMPT[:i], "steps": 1})
            b.send_json({"id": 1, "prompt": "a dress", "steps": 1})
            replies = [a.receive_json() for _ in range(20)]
            other = b.receive_json()
    images = [r["id"] for r in replies if r["type"] == "image"]
    dropped = [r["id"] for r in replies if r["type"] == "dropped"]
    assert sorted(images + dropped) == list(range(1, 21))  # every id answered exactly once
    assert images[-1] == 20 and images == sorted(images)  # the newest always arrives, never out of order
    assert len(images) <= 3, images  # the one in flight when typing began, maybe one more, then the newest
    assert other["type"] == "image"
    assert max(overlap) == 1  # two connections, never two generations at once
    assert len(overlap) == len(images) + 1 == hub.stats["generated"]
    assert hub.stats["dropped"] == len(dropped)


# --- img2img glue --------------------------------------------------------------------------------------------------


def test_img2img_over_the_web_equals_the_library(teacher_engine):
    """An upload goes through the one image-loading path and :func:`lcm.sample.generate`: the server's images equal
    the library's for the same file, strength and seeds."""
    from lcm.images import decode_image_bytes

    upload = png_of((100, 60), "RGB")
    with local_client(create_app(teacher_engine)) as client:
        body = client.post(
            "/api/generate", json={"prompt": PROMPT, "image": upload, "strength": 0.5, "steps": 4, "batch": 2}
        ).json()
    assert body["img2img"] is True
    model = teacher_engine.model
    init = decode_image_bytes(base64.b64decode(upload), 1, (32, 32))
    want = generate(model, [PROMPT] * 2, Sampler.DDIM, 4, model.default_w, [0, 1], init_images=init, strength=0.5)
    for got, image in zip(body["images"], to_uint8(want), strict=True):
        np.testing.assert_array_equal(pixels(got), image[..., 0])


def test_inpainting_over_the_socket_equals_the_library(lcm_engine):
    """An image and a mask (white = repaint, of another size than the model's: resized as the image is) go through
    :func:`lcm.sample.generate` with ``mask=``: the server's images equal the library's, seed by seed."""
    from lcm.images import decode_image_bytes

    rng = np.random.default_rng(1)
    picture = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)).save(picture, format="PNG")
    stencil = np.zeros((40, 64), np.uint8)
    stencil[8:32, 32:] = 255  # repaint a block on the right; keep the rest
    drawn = io.BytesIO()
    Image.fromarray(stencil).save(drawn, format="PNG")
    upload, mask = (base64.b64encode(b.getvalue()).decode() for b in (picture, drawn))
    request = {"prompt": PROMPT, "steps": 4, "w": 2.0, "seed": 5, "batch": 2, "strength": 0.75, "image": upload}
    with local_client(create_app(lcm_engine)) as client, client.websocket_connect("/ws") as ws:
        ready(ws)
        ws.send_json({"id": 1, **request, "mask": "data:image/png;base64," + mask})
        reply = ws.receive_json()
        ws.send_json({"id": 2, **request, "mask": mask, "steps": 1})  # int(1 · 0.75) = 0 inpainting steps
        refused = ws.receive_json()
    assert reply["type"] == "image" and reply["inpaint"] is True and reply["img2img"] is True, reply
    assert refused["type"] == "error" and refused["id"] == 2 and "raise the strength" in refused["message"]
    init = decode_image_bytes(base64.b64decode(upload), 1, (32, 32))
    white = (decode_image_bytes(base64.b64decode(mask), 1, (32, 32)) + 1) / 2
    with torch.no_grad():
        want = generate(
            lcm_engine.model, [PROMPT] * 2, Sampler.LCM, 4, 2.0, [5, 6], init_images=init, mask=white, strength=0.75
        )
    for got, image in zip(reply["images"], to_uint8(want), strict=True):
        np.testing.assert_array_equal(pixels(got), image[..., 0])


# --- the command -----------------------------------------------------------------------------------------------------


def test_serve_flags_are_checked_before_any_model_loads(monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(LatentDiffusion, "from_pretrained", no_loading)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    bad = [
        (["--port", "70000"], "--port"),
        (["--max-steps", "0"], "--max-steps"),
        (["--max-batch", "0"], "--max-batch"),
        (["--max-prompt-length", "0"], "--max-prompt-length"),
        (["--max-upload-kb", "0"], "--max-upload-kb"),
        (["--max-image-side", "0"], "--max-image-side"),
        (["--rate", "0"], "--rate"),
        (["--rate", "nan"], "--rate"),
        (["--max-connections", "0"], "--max-connections"),
        (["--threads", "0"], "--threads"),
        (["--lora-scale", "0.5"], "--lora-scale"),
        (["--lora-scale", "nan"], "--lora-scale"),
        (["--lora", "/missing/lora.safetensors"], "--lora"),
        (["--model", "/missing/model"], "--model"),
        (["--host", "no such host.invalid"], "--host"),
        (["--port", str(taken.getsockname()[1])], "--port"),
    ]
    try:
        for argv, flag in bad:
            code = main(["serve", *argv])
            err = capsys.readouterr().err.strip()
            assert code == 2 and "\n" not in err and err.startswith("lcm serve: error:") and flag in err, (argv, err)
    finally:
        taken.close()


def test_loopback_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.4", "example.com"))


def test_an_upload_and_the_same_file_on_the_command_line_give_the_same_init_image(tmp_path):
    """One image-loading path: EXIF orientation applied and the same resampling for ``lcm serve`` uploads and
    ``lcm sample --image`` (a rotated JPEG that both read differently before)."""
    from lcm.images import load_image
    from lcm.serve.protocol import decode_image

    pixels = np.zeros((40, 64, 3), np.uint8)
    pixels[:, :20] = (250, 10, 10)  # a red band on the left, a dark rest
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    upload = base64.b64encode(path.read_bytes()).decode()
    for channels in (1, 3):
        served = decode_image(upload, Limits(), (channels, 32, 32))
        loaded = load_image(path, channels, (32, 32))
        torch.testing.assert_close(served, loaded, rtol=0, atol=0)
    assert loaded[0, 0, :8].mean() > loaded[0, 0, -8:].mean()  # upright: the red band is now on top
