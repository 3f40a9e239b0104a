"""Keystroke-to-image latency of ``lcm serve`` through its real WebSocket, as a fast typist feels it; or, with
``--stream``, the frame rate of streaming img2img, as the page's camera sends frames.

    python benchmarks/serve.py                       # the embedded LCM on the CPU, 4 steps, ~10 s of typing
    python benchmarks/serve.py --model lcm-demo/lcm --steps 2 --seconds 20
    python benchmarks/serve.py --stream              # 10 init images, cycling, one frame in flight, ~10 s

The server runs in this process (uvicorn in a thread, on a free loopback port). Typing: the client types prompts one
character at a time, a request every ``--interval-ms``, over a WebSocket. A keystroke is answered by the first image
whose request id is its own or later (the server drops stale requests), so its latency is that image's arrival minus
the keystroke's send time. Reports p50/p95 latency, images per second sustained and the server-side generation time,
against the goals (median <= 100 ms at 4 steps, >= 10 images/s on a 2-core CPU), and writes JSON (``--out``).

Streaming: the client sends img2img requests (``--strength``) whose init images cycle through ``--images`` different
pictures at the model's size (PNG data: URLs, as the page sends a camera frame), the next as soon as the previous is
answered, never two at once, for ``--seconds`` or ``--frames``. Reports frames per second sustained (images answered
over the time from the first send to the last answer) and the p50/p90 frame->image latency (send to image received).

Without ``--model`` it uses the shipped embedded LCM, or a w-conditioned copy of the shipped teacher (as
benchmarks/sampling.py; the speed does not depend on distillation).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PHRASES = (
    "a red sneaker with white laces",
    "a long summer dress",
    "a leather ankle boot",
    "a striped cotton t-shirt",
    "a small handbag with a strap",
)
GOALS = {"p50_ms": 100.0, "images_per_s": 10.0}
STREAM_PROMPT = "a red sneaker with white laces"


def keystrokes():
    """Prompts as they grow while typing, phrase after phrase."""
    while True:
        for phrase in PHRASES:
            for n in range(1, len(phrase) + 1):
                yield phrase[:n]


def model_folder(given: str | None) -> tuple[Path, str]:
    from lcm.shipped import ASSETS

    if given:
        return Path(given), given
    if (ASSETS / "fashion-lcm" / "unet").is_dir():
        return ASSETS / "fashion-lcm", "shipped embedded LCM"
    sys.path.insert(0, str(HERE))
    from sampling import embedded_lcm

    return embedded_lcm(Path(tempfile.mkdtemp(prefix="lcm-serve-bench-")) / "lcm"), "embedded teacher as a w-LCM"


def type_into(url: str, steps: int, interval: float, seconds: float) -> dict:
    """Send a request every ``interval`` s for ``seconds``; the send and arrival times of everything."""
    from websockets.sync.client import connect

    sent: list[float] = []  # sent[i - 1]: when request i left (appended by the sender thread only)
    images: list[tuple[int, float, float]] = []  # (id, arrival, server ms)
    counts = {"dropped": 0, "error": 0}
    errors: list[str] = []
    with connect(url.replace("http", "ws", 1) + "/ws", max_size=2**24) as ws:
        assert json.loads(ws.recv())["type"] == "ready"

        def sender() -> None:
            start = time.perf_counter()
            for i, prompt in enumerate(keystrokes(), start=1):
                due = start + (i - 1) * interval
                if due - start > seconds:
                    return
                time.sleep(max(0.0, due - time.perf_counter()))
                sent.append(time.perf_counter())
                ws.send(json.dumps({"id": i, "prompt": prompt, "steps": steps, "seed": 0}))

        thread = threading.Thread(target=sender)
        thread.start()
        last_answered = 0
        while thread.is_alive() or last_answered < len(sent):
            try:
                msg = json.loads(ws.recv(timeout=5))
            except TimeoutError:
                break
            if msg["type"] == "image":
                images.append((msg["id"], time.perf_counter(), msg["ms"]))
            else:
                counts[msg["type"]] += 1
                if msg["type"] == "error":
                    errors.append(msg["message"])
            last_answered = max(last_answered, msg["id"] or 0)
        thread.join()
    return {"sent": sent, "images": images, **counts, "errors": errors[:5]}


def init_images(shape: tuple[int, int, int], count: int) -> list[str]:
    """``count`` different pictures at the model's ``(C, H, W)`` (smooth seeded patterns: 4x4 random values, resized
    bicubically) as PNG data: URLs, as the page sends a frame drawn to a canvas of the model's size."""
    import numpy as np
    from PIL import Image

    channels, height, width = shape
    rng = np.random.default_rng(0)
    urls = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (4, 4, channels), dtype=np.uint8)
        picture = Image.fromarray(coarse[..., 0] if channels == 1 else coarse).resize((width, height), Image.BICUBIC)
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
    return urls


def stream_into(url: str, frames: list[str], steps: int, strength: float, seconds: float, count: int | None) -> dict:
    """Send img2img frames cycling through ``frames``, each as soon as the previous one is answered, for ``seconds``
    or ``count`` frames; each frame's send and answer times, the answer's type and server ms."""
    from websockets.sync.client import connect

    records: list[tuple[float, float, str, float | None]] = []  # (sent, answered, reply type, server ms)
    errors: list[str] = []
    with connect(url.replace("http", "ws", 1) + "/ws", max_size=2**24) as ws:
        assert json.loads(ws.recv())["type"] == "ready"
        start = time.perf_counter()
        rid = 0
        while time.perf_counter() - start < seconds and (count is None or rid < count):
            rid += 1
            request = {"id": rid, "prompt": STREAM_PROMPT, "steps": steps, "seed": 0, "strength": strength}
            sent = time.perf_counter()
            ws.send(json.dumps({**request, "image": frames[(rid - 1) % len(frames)]}))
            while (msg := json.loads(ws.recv(timeout=60)))["id"] != rid:  # one frame in flight: the next reply is its
                pass
            records.append((sent, time.perf_counter(), msg["type"], msg.get("ms")))
            if msg["type"] == "error":
                errors.append(msg["message"])
    return {"records": records, "errors": errors[:5]}


def summarise_stream(run: dict) -> dict:
    records = run["records"]
    images = [(sent, answered, ms) for sent, answered, kind, ms in records if kind == "image"]
    if not images:
        raise SystemExit(f"no frame was answered with an image: {run['errors'][:1]}")
    latencies = [(answered - sent) * 1e3 for sent, answered, _ in images]
    server_ms = [ms for _, _, ms in images]
    deciles = statistics.quantiles(latencies, n=10) if len(latencies) > 1 else latencies * 9
    return {
        "frames": len(records),
        "images": len(images),
        "dropped": sum(kind == "dropped" for _, _, kind, _ in records),
        "errors": sum(kind == "error" for _, _, kind, _ in records),
        "frames_per_s": len(images) / (records[-1][1] - records[0][0]),
        "latency_ms": {"p50": statistics.median(latencies), "p90": deciles[8], "mean": statistics.fmean(latencies)},
        "latency_max_ms": max(latencies),
        "server_ms": {"p50": statistics.median(server_ms)},
    }


def summarise(run: dict) -> dict:
    sent, images = run["sent"], run["images"]
    latencies, served = [], 0
    for rid, arrival, _ in images:  # images arrive in id order: each serves every keystroke up to its id
        for k in range(served + 1, rid + 1):
            latencies.append((arrival - sent[k - 1]) * 1e3)
        served = max(served, rid)
    q = statistics.quantiles(latencies, n=20)
    first, last = sent[0], max(a for _, a, _ in images)
    server_ms = [ms for _, _, ms in images]
    return {
        "keystrokes": len(sent),
        "images": len(images),
        "dropped": run["dropped"],
        "errors": run["error"],
        "unanswered_keystrokes": len(sent) - len(latencies),
        "latency_ms": {"p50": statistics.median(latencies), "p95": q[18], "mean": statistics.fmean(latencies)},
        "latency_max_ms": max(latencies),
        "images_per_s": len(images) / (last - first),
        "server_ms": {"p50": statistics.median(server_ms), "p95": statistics.quantiles(server_ms, n=20)[18]},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: the embedded LCM)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps per image (default 4)")
    p.add_argument("--interval-ms", type=float, default=30.0, help="time between keystrokes (default 30)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to type, or to stream (default 10)")
    p.add_argument("--stream", action="store_true", help="stream img2img frames instead of typing")
    p.add_argument("--frames", type=int, help="--stream: stop after this many frames (default: after --seconds)")
    p.add_argument("--images", type=int, default=10, help="--stream: different init images, cycling (default 10)")
    p.add_argument("--strength", type=float, default=0.6, help="--stream: img2img strength (default 0.6)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, as lcm serve's default (1)")
    p.add_argument(
        "--compile",
        choices=["off", "on"],
        default="off",
        help="lcm serve --compile: on the CPU the server answers eagerly at once, a second process compiles, and "
        "the measurement starts when the compiled networks are in use",
    )
    p.add_argument("--out", help="JSON output (default: results/serve-cpu.json, with --stream serve-stream-cpu.json)")
    args = p.parse_args(argv)
    if (args.frames is not None and args.frames < 1) or args.images < 1:
        p.error("--frames and --images must be at least 1")
    out = Path(args.out or HERE / "results" / ("serve-stream-cpu.json" if args.stream else "serve-cpu.json"))

    from lcm.serve import Limits, create_app, load_engine
    from lcm.serve.server import start_in_thread

    torch.set_num_threads(args.threads)
    folder, label = model_folder(args.model)
    start = time.perf_counter()
    engine = load_engine(folder, torch.device("cpu"), torch.float32, args.compile)
    load_s = time.perf_counter() - start  # until the server answers (eagerly, while a compile builds elsewhere)
    while engine.background is not None and engine.background.running:  # measure what runs after the compile
        time.sleep(0.5)
    compiled_s = time.perf_counter() - start
    if engine.background is not None and engine.background.failed:
        sys.exit(f"the background compile failed: {engine.background.last_line()}")
    limits = Limits()
    server = start_in_thread(create_app(engine, limits), limits)
    try:
        if args.stream:
            frames = init_images(engine.image_shape, args.images)
            stream_into(server.url, frames, args.steps, args.strength, 1.0, 5)  # warm the path end to end
            run = stream_into(server.url, frames, args.steps, args.strength, args.seconds, args.frames)
        else:
            type_into(server.url, args.steps, args.interval_ms / 1e3, 1.0)  # warm the path end to end
            run = type_into(server.url, args.steps, args.interval_ms / 1e3, args.seconds)
    finally:
        server.stop()
    summary = summarise_stream(run) if args.stream else summarise(run)
    setting = {"strength": args.strength, "init_images": args.images} if args.stream else {}
    if not args.stream:
        summary["goals"] = {
            "p50_latency_ms<=100": summary["latency_ms"]["p50"] <= GOALS["p50_ms"],
            "images_per_s>=10": summary["images_per_s"] >= GOALS["images_per_s"],
        }
        setting = {"interval_ms": args.interval_ms}
    result = {
        "device": platform.processor() or platform.machine() or "cpu",
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "torch": torch.__version__,
        "model": label,
        "mode": "stream" if args.stream else "typing",
        "sampler": engine.sampler.value,
        "steps": args.steps,
        "compile": args.compile,
        "compiled_after_s": round(compiled_s, 1) if args.compile == "on" else None,
        "load_and_warm_up_s": round(load_s, 1),
        **setting,
        "seconds": args.seconds,
        **summary,
        "first_errors": run["errors"],
    }
    lat = summary["latency_ms"]
    if args.stream:
        print(
            f"{label} (compile {args.compile}), {engine.sampler.value} {args.steps} steps, img2img strength "
            f"{args.strength:g}, {summary['frames']} frames cycling through {args.images} init images, one in flight: "
            f"{summary['frames_per_s']:.1f} frames/s; frame->image p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms; "
            f"server {summary['server_ms']['p50']:.1f} ms/frame (p50); {summary['dropped']} dropped, "
            f"{summary['errors']} errors"
        )
    else:
        print(
            f"{label} (compile {args.compile}), {engine.sampler.value} {args.steps} steps, a keystroke every "
            f"{args.interval_ms:g} ms for {args.seconds:g} s: keystroke->image p50 {lat['p50']:.1f} ms, "
            f"p95 {lat['p95']:.1f} ms; "
            f"{summary['images_per_s']:.1f} images/s; server {summary['server_ms']['p50']:.1f} ms/image (p50); "
            f"{summary['dropped']} of {summary['keystrokes']} requests dropped as stale"
        )
        print("goals: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in summary["goals"].items()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
