"""Keystroke-to-image latency of ``lcm serve`` through its real WebSocket, as a fast typist feels it.

    python benchmarks/serve.py                       # the embedded LCM on the CPU, 4 steps, ~10 s of typing
    python benchmarks/serve.py --model lcm-demo/lcm --steps 2 --seconds 20

The server runs in this process (uvicorn in a thread, on a free loopback port); the client types prompts one
character at a time, a request every ``--interval-ms``, over a WebSocket. A keystroke is answered by the first image
whose request id is its own or later (the server drops stale requests), so its latency is that image's arrival minus
the keystroke's send time. Reports p50/p95 latency, images per second sustained and the server-side generation time,
against the goals (median <= 100 ms at 4 steps, >= 10 images/s on a 2-core CPU), and writes JSON (``--out``).
Without ``--model`` it uses the shipped embedded LCM, or a w-conditioned copy of the shipped teacher (as
benchmarks/sampling.py; the speed does not depend on distillation).
"""

from __future__ import annotations

import argparse
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


def keystrokes():
    """Prompts as they grow while typing, phrase after phrase."""
    while True:
        for phrase in PHRASES:
            for n in range(1, len(phrase) + 1):
                yield phrase[:n]


def model_folder(given: str | None) -> tuple[Path, str]:
    from lcm.sample import ASSETS

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
    p.add_argument("--seconds", type=float, default=10.0, help="how long to type (default 10)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, as lcm serve's default (1)")
    p.add_argument(
        "--compile",
        choices=["off", "on"],
        default="off",
        help="torch.compile the UNet and decoder (lcm serve --compile)",
    )
    p.add_argument("--out", default=str(HERE / "results" / "serve-cpu.json"), help="JSON output")
    args = p.parse_args(argv)

    from lcm.serve import Limits, create_app, load_engine
    from lcm.serve.server import start_in_thread

    torch.set_num_threads(args.threads)
    folder, label = model_folder(args.model)
    start = time.perf_counter()
    engine = load_engine(folder, torch.device("cpu"), torch.float32, args.compile)  # compiles while warming up
    load_s = time.perf_counter() - start
    limits = Limits()
    server = start_in_thread(create_app(engine, limits), limits)
    try:
        type_into(server.url, args.steps, args.interval_ms / 1e3, 1.0)  # warm the path end to end
        run = type_into(server.url, args.steps, args.interval_ms / 1e3, args.seconds)
    finally:
        server.stop()
    summary = summarise(run)
    summary["goals"] = {
        "p50_latency_ms<=100": summary["latency_ms"]["p50"] <= GOALS["p50_ms"],
        "images_per_s>=10": summary["images_per_s"] >= GOALS["images_per_s"],
    }
    result = {
        "device": platform.processor() or platform.machine() or "cpu",
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "torch": torch.__version__,
        "model": label,
        "sampler": engine.sampler.value,
        "steps": args.steps,
        "compile": args.compile,
        "load_and_warm_up_s": round(load_s, 1),
        "interval_ms": args.interval_ms,
        "seconds": args.seconds,
        **summary,
        "first_errors": run["errors"],
    }
    lat = summary["latency_ms"]
    print(
        f"{label} (compile {args.compile}), {engine.sampler.value} {args.steps} steps, a keystroke every "
        f"{args.interval_ms:g} ms for {args.seconds:g} s: keystroke->image p50 {lat['p50']:.1f} ms, "
        f"p95 {lat['p95']:.1f} ms; "
        f"{summary['images_per_s']:.1f} images/s; server {summary['server_ms']['p50']:.1f} ms/image (p50); "
        f"{summary['dropped']} of {summary['keystrokes']} requests dropped as stale"
    )
    print("goals: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in summary["goals"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
