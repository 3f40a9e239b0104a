"""What a client may ask of ``lcm serve`` and how it is answered (docs/serve.md).

A request is one JSON object, the same over the WebSocket and ``POST /api/generate``::

    {"id": 7, "prompt": "a red sneaker", "negative_prompt": "", "steps": 4, "w": 3.0, "seed": 0, "batch": 1,
     "image": "data:image/png;base64,...", "strength": 0.6, "sampler": "tcd", "gamma": 0.3,
     "negative_guidance": 1.0, "mask": "data:image/png;base64,..."}

Only ``prompt`` is required (and ``id`` on the socket); ``image``/``strength`` ask for img2img, and with ``mask``
(white = repaint) for inpainting; ``sampler`` ("lcm"
or "tcd" for an LCM, "ddim" for a teacher; default the model's), ``gamma`` (TCD's γ) and ``negative_guidance`` (an
LCM's guidance away from ``negative_prompt``, a second UNet call per step; docs/sampling.md) are optional. Every check
lives here and ends in a :class:`RequestError` whose message is one line, so a client learns what to change and its
connection stays usable. Replies are the ``*_message`` dicts below.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from lcm.config.knobs import knob, validate
from lcm.config.sampling import DEFAULT_STRENGTH

__all__ = [
    "MAX_SEED",
    "MAX_W",
    "Limits",
    "Request",
    "RequestError",
    "TokenBucket",
    "decode_image",
    "decode_mask",
    "dropped_message",
    "error_message",
    "image_message",
    "parse_request",
    "read_json",
    "request_id",
]

MAX_W = 30.0  # guidance beyond this only saturates images; a bound keeps sliders and scripts sane
MAX_SEED = 2**32 - 1
FIELDS = (
    "id",
    "prompt",
    "negative_prompt",
    "steps",
    "w",
    "seed",
    "batch",
    "image",
    "strength",
    "sampler",
    "gamma",
    "negative_guidance",
    "mask",
)
SAMPLERS = ("lcm", "tcd", "ddim")  # what a request may name; the engine refuses those its model cannot run


class RequestError(ValueError):
    """A request the server refuses; ``str(err)`` is the one line sent back, ``rid`` the request's id if it had one."""

    def __init__(self, message: str, rid: int | None = None):
        super().__init__(message)
        self.rid = rid


@dataclass(frozen=True)
class Limits:
    """What one request, and one connection, may ask for: each a knob, and so a flag of ``lcm serve``."""

    max_steps: int = knob(8, "sampling steps per image", lo=1, hi=100)
    max_batch: int = knob(4, "images per request", lo=1, hi=64)
    max_prompt_chars: int = knob(
        300, "characters per prompt or negative prompt", lo=1, hi=100_000, flag="--max-prompt-length"
    )
    max_upload_kb: int = knob(4096, "size of an img2img upload (an image or a mask) in KiB", lo=1, hi=256 * 1024)
    max_image_side: int = knob(
        4096, "width or height of an upload in pixels, before it is resized to the model's", lo=1, hi=16384
    )
    rate: float = knob(
        60.0,
        "requests per second per connection, bursts of one second's worth (a slider drag sends up to one per frame)",
        lo=0,
        open_lo=True,
    )
    max_connections: int = knob(8, "open WebSockets, and HTTP generations waiting at once", lo=1, hi=10_000)
    request_timeout: float = knob(
        10.0, "seconds a client may take to send a request's head, and its body", lo=0, hi=3600, open_lo=True
    )

    def __post_init__(self):
        validate(self)

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_kb * 1024

    @property
    def max_request_bytes(self) -> int:
        """The largest request worth reading: an image and a mask, each up to ``max_upload_bytes`` in base64, and
        64 KiB for the other fields."""
        return 2 * ((self.max_upload_bytes * 4) // 3 + 4) + 65536

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_w": MAX_W, "max_seed": MAX_SEED}


@dataclass(frozen=True, eq=False)
class Request:
    """A validated generation request; ``image`` is ``[1, C, H, W]`` in [−1, 1] at the model's size, or None;
    ``mask`` (only with an image) ``[1, 1, H, W]`` in [0, 1] at the same size, 1 = repaint, or None."""

    id: int | None
    prompt: str
    negative_prompt: str
    steps: int
    w: float
    seed: int
    batch: int
    image: torch.Tensor | None = None
    strength: float = DEFAULT_STRENGTH
    sampler: str | None = None  # None: the engine's default for its model
    gamma: float | None = None  # TCD's γ; None: the model's (0 for PCM, else 0.3)
    negative_guidance: float = 0.0  # LCMs: S of out(prompt) + S·(out(prompt) − out(negative prompt))
    mask: torch.Tensor | None = None  # inpainting: where the image is repainted


def parse_request(
    text_or_obj: str | bytes | dict,
    limits: Limits,
    defaults: dict[str, Any],
    image_shape: tuple[int, int, int],
    require_id: bool = True,
) -> Request:
    """A :class:`Request` from a JSON text (or decoded object), or a one-line :class:`RequestError`.

    ``defaults`` gives ``steps`` and ``w`` when a request leaves them out; ``image_shape`` is the model's
    ``(C, H, W)``, to which an upload is converted.
    """
    obj = read_json(text_or_obj)
    try:
        return _checked(obj, limits, defaults, image_shape, require_id)
    except RequestError as err:
        err.rid = request_id(obj)
        raise


def request_id(obj: dict) -> int | None:
    """The id of a request object, when it has a usable one (to label a refusal)."""
    rid = obj.get("id")
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else None


def _checked(obj: dict, limits: Limits, defaults: dict[str, Any], image_shape, require_id: bool) -> Request:
    if unknown := sorted(set(obj) - set(FIELDS)):
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(FIELDS)}")
    rid = obj.get("id")
    if rid is None and require_id:
        raise RequestError("id: each request needs an integer id (replies carry it)")
    if rid is not None:
        rid = _int(rid, "id", 0, 2**53)
    prompt = _text(obj.get("prompt"), "prompt", limits.max_prompt_chars, required=True)
    negative = _text(obj.get("negative_prompt", ""), "negative_prompt", limits.max_prompt_chars)
    steps = _int(obj.get("steps", min(defaults["steps"], limits.max_steps)), "steps", 1, limits.max_steps)
    w = _number(obj.get("w", defaults["w"]), "w", 0.0, MAX_W)
    seed = _int(obj.get("seed", 0), "seed", 0, MAX_SEED)
    batch = _int(obj.get("batch", 1), "batch", 1, limits.max_batch)
    strength = _number(obj.get("strength", DEFAULT_STRENGTH), "strength", 0.0, 1.0)
    if strength == 0.0:
        raise RequestError("strength must be above 0 (0 would return the uploaded image unchanged)")
    sampler = obj.get("sampler")
    if sampler is not None and sampler not in SAMPLERS:
        raise RequestError(f"sampler must be one of {', '.join(SAMPLERS)}, got {json.dumps(sampler)}")
    gamma = None if obj.get("gamma") is None else _number(obj["gamma"], "gamma", 0.0, 1.0)
    negative_guidance = _number(obj.get("negative_guidance", 0.0), "negative_guidance", 0.0, MAX_W)
    image = obj.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise RequestError("image must be a base64 string (or a data: URL), got " + type(image).__name__)
        image = decode_image(image, limits, image_shape)
    mask = obj.get("mask")
    if mask is not None:
        if image is None:
            raise RequestError("mask needs an image: send the image to repaint with it (white = repaint)")
        if not isinstance(mask, str):
            raise RequestError("mask must be a base64 string (or a data: URL), got " + type(mask).__name__)
        mask = decode_mask(mask, limits, image_shape[1:])
    return Request(
        rid, prompt, negative, steps, w, seed, batch, image, strength, sampler, gamma, negative_guidance, mask
    )


def read_json(text_or_obj: str | bytes | dict) -> dict:
    """The JSON object of a message, or a one-line :class:`RequestError`."""
    if isinstance(text_or_obj, dict):
        return text_or_obj
    try:
        obj = json.loads(text_or_obj)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"not valid JSON ({err.msg if hasattr(err, 'msg') else err})") from None
    except RecursionError:
        raise RequestError("not valid JSON (nested too deeply)") from None
    except ValueError as err:  # e.g. an integer past Python's digit limit
        raise RequestError(f"not valid JSON ({' '.join(str(err).split())[:120]})") from None
    if not isinstance(obj, dict):
        raise RequestError(f"a request must be a JSON object, got {type(obj).__name__}")
    return obj


def _int(value: Any, name: str, low: int, high: int) -> int:
    # bool is an int in Python and a float like 4.0 is an int in JSON's eyes: accept the latter, never the former
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {json.dumps(value)}")
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {json.dumps(value)}")
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low:g} and {high:g}, got {value:g}")
    return float(value)


def _text(value: Any, name: str, max_chars: int, required: bool = False) -> str:
    if value is None and required:
        raise RequestError(f"{name} is required")
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {json.dumps(value)}")
    if len(value) > max_chars:
        raise RequestError(f"{name} is too long: {len(value)} characters, at most {max_chars}")
    return value


UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # the decoders an upload may reach, and no others


def decode_image(data: str, limits: Limits, shape: tuple[int, int, int], field: str = "image") -> torch.Tensor:
    """A base64 image (a ``data:`` URL or bare base64) of one of the :data:`UPLOAD_FORMATS` → ``[1, C, H, W]`` in
    [−1, 1] at the model's size; refusals name ``field``."""
    from lcm.images import ImageTooLarge, decode_image_bytes

    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) > (limits.max_upload_bytes * 4) // 3 + 4:
        raise RequestError(f"{field} is too large: at most {limits.max_upload_bytes // 1024} KiB")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field} is not valid base64") from None
    channels, height, width = shape
    try:
        return decode_image_bytes(
            raw, channels, (height, width), formats=UPLOAD_FORMATS, max_side=limits.max_image_side
        )
    except ImageTooLarge as err:
        raise RequestError(f"{field}: {err}" if field != "image" else str(err)) from None
    except ValueError:
        raise RequestError(f"{field} is not a readable image (PNG, JPEG, WebP, GIF, BMP)") from None


def decode_mask(data: str, limits: Limits, size: tuple[int, int]) -> torch.Tensor:
    """An inpainting mask, checked and resized as an image (:func:`decode_image`) → ``[1, 1, H, W]`` in [0, 1]
    (its grey levels; white = repaint), for :func:`lcm.sample.repaint_mask` to binarise."""
    grey = decode_image(data, limits, (1, *size), field="mask")
    return (grey + 1.0) / 2.0  # as lcm.images.load_mask reads a mask file


class TokenBucket:
    """At most ``rate`` requests a second on average, bursts of up to one second's worth."""

    def __init__(self, rate: float, clock=time.monotonic):
        self.rate, self.capacity, self.clock = rate, max(rate, 1.0), clock
        self.tokens, self.stamp = self.capacity, clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def error_message(message: str, rid: int | None = None) -> dict[str, Any]:
    return {"type": "error", "id": rid, "message": " ".join(str(message).split())}  # always one line


def dropped_message(rid: int | None) -> dict[str, Any]:
    """A request replaced by a newer one before the generator reached it."""
    return {"type": "dropped", "id": rid}


def image_message(req: Request, pngs: list[bytes], ms: float, sampler: str, compile: str = "off") -> dict[str, Any]:
    """The answer to a request: its PNGs as data: URLs, the server-side ms, the settings they were made with, and
    whether the networks ran compiled (``compile``: off, building, on or failed)."""
    return {
        "type": "image",
        "id": req.id,
        "images": ["data:image/png;base64," + base64.b64encode(png).decode("ascii") for png in pngs],
        "ms": round(ms, 2),
        "sampler": sampler,
        "steps": req.steps,
        "w": req.w,
        "seed": req.seed,
        "batch": req.batch,
        "img2img": req.image is not None,
        "inpaint": req.mask is not None,
        "gamma": req.gamma if sampler == "tcd" else None,
        "negative_guidance": req.negative_guidance,
        "compile": compile,
    }
