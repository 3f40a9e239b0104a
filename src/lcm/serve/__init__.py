"""``lcm serve``: a web page that regenerates images as you type, over a WebSocket (docs/serve.md).

- :mod:`lcm.serve.protocol` what a request may ask (and the limits), and the replies;
- :mod:`lcm.serve.engine`   the model behind it: one generation at a time, cached prompt embeddings;
- :mod:`lcm.serve.app`      the FastAPI app: the page, the WebSocket (newest request wins), ``/api/*``;
- :mod:`lcm.serve.server`   uvicorn on a pre-bound socket, in the foreground or a background thread.

The names below load on first use, so that ``lcm --help`` does not import the web stack.
"""

from __future__ import annotations

import importlib

__all__ = ["Engine", "Limits", "create_app", "load_engine", "serve_model_path"]

_HOMES = {
    "Engine": "engine",
    "load_engine": "engine",
    "serve_model_path": "engine",
    "Limits": "protocol",
    "create_app": "app",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"lcm.serve.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'lcm.serve' has no attribute {name!r}")
