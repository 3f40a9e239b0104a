"""``lcm serve``: a web page that redraws the image as you type, with a WebSocket and a small HTTP API."""

from __future__ import annotations

import argparse
import math
import sys

from lcm.cli.common import add_speed_args, check_float, check_int
from lcm.serve.hosts import is_address
from lcm.serve.protocol import Limits

_LIMITS = Limits()


def check_flags(args: argparse.Namespace) -> None:
    """Every flag against its range, before the socket is bound or any model is loaded."""
    from lcm.locations import local_path_or_none

    check_int(args.port, "--port", 0, 65535)
    check_int(args.max_steps, "--max-steps", 1, 100)
    check_int(args.max_batch, "--max-batch", 1, 64)
    check_int(args.max_prompt_length, "--max-prompt-length", 1, 100_000)
    check_int(args.max_upload_kb, "--max-upload-kb", 1, 256 * 1024)
    check_int(args.max_image_side, "--max-image-side", 1, 16384)
    check_float(args.rate, "--rate", 0, open_low=True)
    check_int(args.max_connections, "--max-connections", 1, 10_000)
    check_int(args.threads, "--threads", 1, 1024)
    check_float(args.request_timeout, "--request-timeout", 0, open_low=True, high=3600)
    for name in args.allowed_host or []:
        if not name.strip() or any(c in name for c in " /?#@"):
            raise ValueError(f"--allowed-host takes a host name such as myhost.lan, got {name!r}")
    if not math.isfinite(args.lora_scale):
        raise ValueError(f"--lora-scale must be a finite number, got {args.lora_scale}")
    if not args.host.strip():
        raise ValueError("--host must name an address, e.g. 127.0.0.1")
    if args.lora is None and args.lora_scale != 1.0:
        raise ValueError("--lora-scale needs --lora")
    if args.lora is not None and not local_path_or_none(args.lora).exists():
        raise ValueError(f"--lora {args.lora}: no such file or folder")
    if args.model is not None:
        local = local_path_or_none(args.model, owner_required=True)
        if local is not None and not local.is_dir():
            raise ValueError(f"--model {args.model}: no model folder there (and it is not a hub id owner/name)")


def limits_from(args: argparse.Namespace) -> Limits:
    return Limits(
        max_steps=args.max_steps,
        max_batch=args.max_batch,
        max_prompt_chars=args.max_prompt_length,
        max_upload_bytes=args.max_upload_kb * 1024,
        max_image_side=args.max_image_side,
        rate=args.rate,
        max_connections=args.max_connections,
        request_timeout=args.request_timeout,
    )


def allowed_hosts(args: argparse.Namespace) -> tuple[str, ...]:
    """The names besides localhost and IP addresses that requests may address the server by: ``--allowed-host``,
    and the ``--host`` it listens on when that is a name."""
    return tuple(args.allowed_host or ()) + ((args.host,) if not is_address(args.host) else ())


def run_serve(args: argparse.Namespace) -> int:
    check_flags(args)
    import torch

    from lcm.models.fast import parse_device, parse_dtype
    from lcm.serve import create_app, load_engine, serve_model_path
    from lcm.serve.server import bind, is_loopback, run, url

    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        torch.set_num_threads(1)  # see --threads
    sock = bind(args.host, args.port)
    if not is_loopback(args.host):
        print(
            f"lcm serve: warning: listening on {args.host}, not loopback: anyone who can reach this port can use "
            "the model (there is no authentication)",
            file=sys.stderr,
        )
    limits = limits_from(args)
    engine = load_engine(
        args.model or serve_model_path(), device, dtype, args.compile, lora=args.lora, lora_scale=args.lora_scale
    )
    info = engine.info()
    print(
        f"lcm serve: {url(sock)}  ({info['model']}, {info['sampler']} sampler, {info['device']} {info['dtype']}; "
        "Ctrl-C stops it)",
        flush=True,
    )
    run(create_app(engine, limits, allowed_hosts(args)), limits, sock)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="a web page that regenerates the image as you type (WebSocket; HTTP API at /api/generate)",
        description=(
            "Serve a page where typing a prompt or moving a slider (steps, guidance w, seed, strength) or dropping "
            "an image (img2img) regenerates the image continuously. Stale requests are dropped: each connection "
            "keeps only its newest pending request. LCMs are sampled with the LCM sampler, other models with DDIM. "
            "Listens on 127.0.0.1 only unless --host says otherwise. Protocol: docs/serve.md."
        ),
    )
    p.add_argument(
        "--model",
        help="diffusers-format model folder or hub id (default: the shipped embedded LCM when installed, else "
        "the shipped Fashion teacher)",
    )
    p.add_argument(
        "--lora",
        help="a LoRA file or folder applied to --model's UNet, e.g. an LCM-LoRA (diffusers', kohya's or peft's "
        "naming; .safetensors); it is sampled as an LCM",
    )
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of --lora (default 1)")
    net = p.add_argument_group("network")
    net.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network, "
        "without authentication)",
    )
    net.add_argument("--port", type=int, default=7860, help="TCP port (default 7860; 0: any free port)")
    net.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="a host name browsers may reach the server by, besides localhost and IP addresses (repeatable; the "
        "--host name is allowed too). Requests naming any other host are refused: this stops other sites' pages "
        "from reaching the server through DNS rebinding",
    )
    lim = p.add_argument_group("limits (what one request or connection may ask)")
    lim.add_argument(
        "--max-steps", type=int, default=_LIMITS.max_steps, help=f"sampling steps (default {_LIMITS.max_steps})"
    )
    lim.add_argument(
        "--max-batch", type=int, default=_LIMITS.max_batch, help=f"images per request (default {_LIMITS.max_batch})"
    )
    lim.add_argument(
        "--max-prompt-length",
        type=int,
        default=_LIMITS.max_prompt_chars,
        help=f"characters per prompt or negative prompt (default {_LIMITS.max_prompt_chars})",
    )
    lim.add_argument(
        "--max-upload-kb",
        type=int,
        default=_LIMITS.max_upload_bytes // 1024,
        help=f"size of an img2img upload in KiB (default {_LIMITS.max_upload_bytes // 1024})",
    )
    lim.add_argument(
        "--max-image-side",
        type=int,
        default=_LIMITS.max_image_side,
        help=f"width or height of an upload in pixels, before it is resized to the model's (default "
        f"{_LIMITS.max_image_side})",
    )
    lim.add_argument(
        "--rate",
        type=float,
        default=_LIMITS.rate,
        help=f"requests per second per connection, bursts of one second's worth (default {_LIMITS.rate:g}; "
        "a slider drag sends up to one per frame)",
    )
    lim.add_argument(
        "--max-connections",
        type=int,
        default=_LIMITS.max_connections,
        help=f"open WebSockets, and HTTP generations waiting at once (default {_LIMITS.max_connections})",
    )
    lim.add_argument(
        "--request-timeout",
        type=float,
        default=_LIMITS.request_timeout,
        help=f"seconds a client may take to send a request's head, and its body, before the connection is closed "
        f"(default {_LIMITS.request_timeout:g})",
    )
    speed = add_speed_args(p, "each new batch size compiles once on first use")
    speed.add_argument(
        "--threads",
        type=int,
        help="CPU threads per generation (default 1 on the CPU: one image of a small model gains little from more, "
        "and spinning threads slow down badly when other processes share the cores; raise it for large models)",
    )
    p.set_defaults(func=run_serve)
