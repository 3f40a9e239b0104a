"""The web app of ``lcm serve``: a page, a WebSocket that regenerates as the user types, and a small HTTP API.

Each connection keeps at most ONE pending request: a newer request replaces it, and the replaced one is answered
``{"type": "dropped"}``, so a fast typist never builds a queue and the image on screen is always the newest one the
generator could reach. Every generation runs in the app's single worker thread, under the engine's lock, whichever
connection asked. Requests with a ``Host`` or ``Origin`` of another site never reach the app
(:class:`lcm.serve.hosts.HostGuard`). See docs/serve.md for the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request as HTTPRequest
from starlette.websockets import WebSocketDisconnect

from lcm.serve.engine import Engine, Result
from lcm.serve.hosts import HostGuard
from lcm.serve.protocol import (
    Limits,
    Request,
    RequestError,
    TokenBucket,
    dropped_message,
    error_message,
    image_message,
    parse_request,
    read_json,
    request_id,
)

__all__ = ["Hub", "create_app"]

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("lcm.serve")


class Hub:
    """What every connection shares: the engine, its one worker thread, the limits and a few counters."""

    def __init__(self, engine: Engine, limits: Limits):
        self.engine, self.limits = engine, limits
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lcm-generate")
        self.connections = 0
        self.http_waiting = 0
        self.stats = {"requests": 0, "generated": 0, "dropped": 0, "refused": 0}

    def parse(self, text_or_obj: Any, require_id: bool = True) -> Request:
        return parse_request(
            text_or_obj, self.limits, self.engine.defaults, self.engine.image_shape, require_id=require_id
        )

    async def generate(self, req: Request) -> Result:
        """Run ``req`` in the worker thread; requests from several connections take turns there."""
        result = await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.run, req)
        self.stats["generated"] += 1
        return result

    def message(self, result: Result) -> dict[str, Any]:
        return image_message(result.request, result.pngs, result.ms, result.sampler.value, result.compile)


class Session:
    """One WebSocket: a receiving loop that validates requests into a one-slot mailbox, and a generating loop that
    always takes the newest request from it."""

    def __init__(self, ws: WebSocket, hub: Hub):
        self.ws, self.hub = ws, hub
        self.pending: Request | None = None  # the one waiting request; never more
        self.wake = asyncio.Event()
        self.send_lock = asyncio.Lock()
        self.bucket = TokenBucket(hub.limits.rate)

    async def send(self, message: dict[str, Any]) -> None:
        async with self.send_lock:  # both loops send: keep frames whole
            await self.ws.send_text(json.dumps(message))

    async def run(self) -> None:
        await self.send({"type": "ready", **self.hub.engine.info(), "limits": self.hub.limits.as_dict()})
        worker = asyncio.create_task(self._generate_loop())
        try:
            await self._receive_loop()
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # a send to a closed socket, mostly
                await worker

    async def _receive_loop(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            await self._accept(message.get("text") if message.get("text") is not None else message.get("bytes"))

    async def _accept(self, text: str | bytes | None) -> None:
        self.hub.stats["requests"] += 1
        allowed = self.bucket.take()  # every message counts, valid or not
        try:
            obj = read_json(text or "")
            if not allowed:
                rate = self.hub.limits.rate
                raise RequestError(f"rate limit: at most {rate:g} requests a second per connection", request_id(obj))
            req = self.hub.parse(obj)
        except RequestError as err:
            self.hub.stats["refused"] += 1
            await self.send(error_message(str(err), err.rid))
            return
        except Exception as err:  # whatever else a malformed message provokes: answered, and the socket lives
            log.exception("request refused")
            self.hub.stats["refused"] += 1
            await self.send(error_message(f"bad request ({type(err).__name__})"))
            return
        replaced, self.pending = self.pending, req
        self.wake.set()
        if replaced is not None:
            self.hub.stats["dropped"] += 1
            await self.send(dropped_message(replaced.id))

    async def _generate_loop(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            req, self.pending = self.pending, None
            if req is None:
                continue
            try:
                reply = self.hub.message(await self.hub.generate(req))
            except RequestError as err:
                reply = error_message(str(err), req.id)
            except Exception as err:  # a failed generation is reported; the connection lives on
                log.exception("generation failed")
                reply = error_message(f"generation failed: {type(err).__name__}: {err}", req.id)
            await self.send(reply)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


def create_app(engine: Engine, limits: Limits | None = None, allowed_hosts: tuple[str, ...] = ()) -> FastAPI:
    """The app for a loaded ``engine``; serve it with uvicorn (``lcm serve``) or test it with FastAPI's TestClient.

    Requests are answered for ``Host`` s that are ``localhost``, an IP address or one of ``allowed_hosts``
    (:mod:`lcm.serve.hosts`)."""
    if not (STATIC / "index.html").is_file():
        raise ValueError(f"the page's files are missing from {STATIC}; reinstall the package")
    hub = Hub(engine, limits or Limits())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        hub.executor.shutdown(wait=False, cancel_futures=True)

    # No generated API docs: their pages load scripts from a CDN, and this app works offline.
    app = FastAPI(title="lcm serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = hub
    app.add_middleware(HostGuard, allowed=allowed_hosts)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        info = {**engine.info(), "limits": hub.limits.as_dict()}
        return {"status": "ok", **info, "connections": hub.connections, "stats": hub.stats}

    @app.post("/api/generate")
    async def api_generate(request: HTTPRequest, format: str = "json") -> Response:
        if format not in ("json", "png"):
            return _error(400, f"format must be json or png, got {format!r}")
        try:
            body = await _read_body(request, hub.limits.max_request_bytes, hub.limits.request_timeout)
        except asyncio.TimeoutError:
            return _error(408, f"the request body did not arrive within {hub.limits.request_timeout:g} s")
        if body is None:
            return _error(413, f"request too large: images up to {hub.limits.max_upload_bytes // 1024} KiB")
        hub.stats["requests"] += 1
        try:
            req = hub.parse(body, require_id=False)
        except RequestError as err:
            hub.stats["refused"] += 1
            return _error(400, str(err))
        except Exception as err:
            log.exception("request refused")
            hub.stats["refused"] += 1
            return _error(400, f"bad request ({type(err).__name__})")
        if hub.http_waiting >= hub.limits.max_connections:
            return _error(503, f"busy: {hub.http_waiting} generations are waiting; try again")
        hub.http_waiting += 1
        try:
            result = await hub.generate(req)
        except RequestError as err:
            return _error(400, str(err))
        except Exception as err:
            log.exception("generation failed")
            return _error(500, f"generation failed: {type(err).__name__}: {err}")
        finally:
            hub.http_waiting -= 1
        if format == "png":
            return Response(_grid_png(result), media_type="image/png", headers={"X-Generate-Ms": f"{result.ms:.2f}"})
        return JSONResponse(hub.message(result))

    @app.websocket("/ws")
    async def websocket(ws: WebSocket) -> None:
        await ws.accept()
        if hub.connections >= hub.limits.max_connections:
            busy = f"server busy: {hub.connections} connections open, at most {hub.limits.max_connections}"
            await ws.send_text(json.dumps(error_message(busy)))
            await ws.close(code=1013)
            return
        hub.connections += 1
        try:
            await Session(ws, hub).run()
        except (WebSocketDisconnect, OSError, RuntimeError):  # the client left while we were sending
            pass
        finally:
            hub.connections -= 1

    return app


async def _read_body(request: HTTPRequest, cap: int, timeout: float) -> bytes | None:
    """The request body, or None past ``cap`` bytes (whatever Content-Length claimed); ``TimeoutError`` when it has
    not all arrived within ``timeout`` seconds (a client that stalls mid-body holds nothing for long)."""

    async def read() -> bytes | None:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    return await asyncio.wait_for(read(), timeout)


def _grid_png(result: Result) -> bytes:
    """The request's images side by side, as one PNG (a single image is returned as it is)."""
    if len(result.pngs) == 1:
        return result.pngs[0]
    import io

    from PIL import Image

    images = [Image.open(io.BytesIO(png)) for png in result.pngs]
    grid = Image.new(images[0].mode, (sum(i.width for i in images), images[0].height))
    for k, image in enumerate(images):
        grid.paste(image, (k * image.width, 0))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()
