"""``lcm serve``: a web page that redraws the image as you type, with a WebSocket and a small HTTP API."""

from __future__ import annotations

import argparse
import sys

from lcm.cli.common import add_lora_flags, add_speed_args, check_int, lora_specs
from lcm.cli.flags import add_section_flags, typed_settings
from lcm.serve.hosts import is_address
from lcm.serve.protocol import Limits


def check_flags(args: argparse.Namespace) -> None:
    """Every flag against its range, before the socket is bound or any model is loaded."""
    from lcm.locations import local_path_or_none

    check_int(args.port, "--port", 0, 65535)
    check_int(args.threads, "--threads", 1, 1024)
    limits_from(args)  # each limit against its range
    for name in args.allowed_host or []:
        if not name.strip() or any(c in name for c in " /?#@"):
            raise ValueError(f"--allowed-host takes a host name such as myhost.lan, got {name!r}")
    if not args.host.strip():
        raise ValueError("--host must name an address, e.g. 127.0.0.1")
    lora_specs(args)
    if args.model is not None:
        local = local_path_or_none(args.model, owner_required=True)
        if local is not None and not local.is_dir():
            raise ValueError(f"--model {args.model}: no model folder there (and it is not a hub id owner/name)")


def limits_from(args: argparse.Namespace) -> Limits:
    return Limits(**{k.removeprefix("limits."): v for k, v in typed_settings(args).items()})


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
    from lcm.shipped import default_model_path

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
    loras = lora_specs(args)
    model = args.model or (default_model_path() if loras else serve_model_path())  # a LoRA's default base: the teacher
    engine = load_engine(model, device, dtype, args.compile, loras)
    info = engine.info()
    compiled = {"building": "; compiling in the background, eager until then", "on": "; compiled"}
    print(
        f"lcm serve: {url(sock)}  ({info['model']}, {info['sampler']} sampler, {info['device']} {info['dtype']}"
        f"{compiled.get(info['compile'], '')}; Ctrl-C stops it)",
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
        "the shipped Fashion teacher; with --lora, the shipped Fashion teacher)",
    )
    add_lora_flags(p)
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
    add_section_flags(p, Limits, "limits.", "limits (what one request or connection may ask)")
    speed = add_speed_args(
        p,
        "on the CPU the server answers at once with the eager networks while another process compiles them "
        "(AOTInductor, cached in $LCM_CACHE/aot), and switches when they are ready; a second start uses the cache at "
        "once. Requests of one image are compiled; larger batches run eagerly",
    )
    speed.add_argument(
        "--threads",
        type=int,
        help="CPU threads per generation (default 1 on the CPU: one image of a small model gains little from more, "
        "and spinning threads slow down badly when other processes share the cores; raise it for large models)",
    )
    p.set_defaults(func=run_serve)
