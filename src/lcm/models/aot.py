"""Ahead-of-time compiled forwards for the CPU: one AOTInductor graph per input signature, no Python in the call.

``torch.compile`` checks thousands of guards before every call of a diffusers UNet (its configs, hooks, and every
parameter): about 0.6 ms on this project's CPU, a quarter of a compiled call of the embedded UNet. An AOTInductor
package has no guards and a C++ wrapper: the call is the kernels. :class:`FixedShapeForward` replaces a module's
``forward`` (or the VAE's ``decode``) and, per signature of its arguments (every tensor's shape, dtype and device,
and the values of the other arguments), exports the eager forward with ``torch.export``, compiles it with
AOTInductor, checks it against the eager output on those very arguments, and from then on calls the package.

The weights are not baked into the package: they are handed to it at load as the module's own tensors (shared, not
copied), and the constants Inductor folds from them (transposed weights and the like) are computed then. So one
package serves every model of an architecture, and the cache key is the architecture, the signature and the software
versions, not the weights; but the weights must not change after the first call (this is a sampling path: training
keeps ``torch.compile``). Packages live in ``$LCM_CACHE/aot``; a second process loads one in milliseconds instead of
compiling for a minute.

A forward made with ``build=False`` never compiles: it runs a package when the cache holds one for the signature and
the eager forward until then, looking again at most once a second. ``lcm serve`` uses it to answer at once while
another process builds the packages (:mod:`lcm.serve.engine`), and switches to them as they appear.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from pathlib import Path

import torch

from lcm.locations import cache_dir

__all__ = ["FixedShapeForward", "compile_forward"]

logger = logging.getLogger(__name__)

_INDUCTOR_CONFIG = {
    "aot_inductor.package_constants_in_so": False,  # weights come from the module at load
    "aot_inductor.use_runtime_constant_folding": True,  # so folded constants are computed from those weights
}
_EAGER = object()  # a signature this module runs eagerly (not exportable, or the compiled output disagreed)
_RECHECK_SECONDS = 1.0  # how often a forward that does not build looks for a package another process builds
_building = threading.local()  # depth > 0 while a package is being built on this thread


@contextmanager
def _tracing_eagerly():
    """While a package is built, compiled forwards inside it run their eager code, so that the graph being exported
    holds the real network (a compiled step calls a UNet whose own forward is compiled too)."""
    _building.depth = getattr(_building, "depth", 0) + 1
    try:
        yield
    finally:
        _building.depth -= 1


class _Call(torch.nn.Module):
    """The eager forward as a module returning one tensor: what is exported."""

    def __init__(self, module: torch.nn.Module, forward, pick):
        super().__init__()
        self.module, self._forward, self._pick = module, forward, pick

    def forward(self, *args, **kwargs):
        return self._pick(self._forward(*args, **kwargs))


class _Unsupported(Exception):
    pass


def _describe(x, tensors: list):
    """Hashable description of one argument; its tensors are appended to ``tensors`` in ``torch.export``'s flat
    order (positional, then keyword in call order, dicts in insertion order)."""
    if isinstance(x, torch.Tensor):
        tensors.append(x)
        return x.shape, x.dtype, x.device, x.requires_grad
    if x is None or isinstance(x, (bool, int, float, str)):
        return type(x), x
    if isinstance(x, dict):
        return (dict,) + tuple((k, _describe(v, tensors)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return (type(x),) + tuple(_describe(v, tensors) for v in x)
    raise _Unsupported


def _signature(args: tuple, kwargs: dict):
    """``(key, tensors)`` of a call: every tensor's shape, dtype and device and the other arguments' values; ``key``
    is ``None`` when an argument is neither a tensor, a plain constant nor a container of them."""
    tensors: list[torch.Tensor] = []
    try:
        key = tuple(_describe(a, tensors) for a in args), tuple((k, _describe(v, tensors)) for k, v in kwargs.items())
    except _Unsupported:
        return None, tensors
    return key, tensors


def _output_form(out):
    """``(pick, rebuild)`` for an output holding one tensor (a tensor, a 1-tuple or a diffusers output whose other
    fields are empty), else ``None``."""
    if isinstance(out, torch.Tensor):
        return (lambda o: o), (lambda t: t)
    if is_dataclass(out) and not isinstance(out, type):
        names = [f.name for f in fields(out)]
        if isinstance(getattr(out, names[0]), torch.Tensor) and all(getattr(out, n) is None for n in names[1:]):
            cls, name = type(out), names[0]
            return (lambda o: getattr(o, name)), (lambda t: cls(**{name: t}))
    if isinstance(out, tuple) and len(out) == 1 and isinstance(out[0], torch.Tensor):
        return (lambda o: o[0]), (lambda t: (t,))
    return None


def _run(package, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Call a loaded package on the flat input tensors. (Its ``__call__`` parses the call spec from JSON and flattens
    the arguments again on every call: a tenth of a millisecond, 5% of a compiled call of the embedded UNet.)"""
    return package.loader.boxed_run(tensors)[0]


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) by name: what the exported graph reads."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _agrees(got: torch.Tensor, want: torch.Tensor) -> bool:
    tol = 1e-3 if want.dtype == torch.float32 else 5e-2  # relative to the output's scale; round-off is far below
    scale = want.abs().max().clamp_min(1e-6)
    return got.shape == want.shape and bool(((got.float() - want.float()).abs().max() / scale) <= tol)


class FixedShapeForward:
    """A drop-in for ``module.forward`` (or another method of it) that runs AOTInductor packages per signature.

    The packages read the module's tensors as they are at its first call: move or convert the module before, never
    after (``lcm.models.fast.optimize`` places it, then installs this).
    """

    def __init__(self, module: torch.nn.Module, method: str = "forward", label: str | None = None, build: bool = True):
        self.module, self.method = module, method
        self.eager = getattr(module, method)
        self.label = label or type(module).__name__
        self.build = build  # False: only load packages that are in the cache (another process builds them)
        self.entries: dict = {}
        self._looked: dict = {}  # signature → when the cache was last looked at (build=False)

    @property
    def compiled(self) -> int:
        """How many signatures run compiled (the others run eagerly)."""
        return sum(entry is not _EAGER for entry in self.entries.values())

    def __call__(self, *args, **kwargs):
        if getattr(_building, "depth", 0):
            return self.eager(*args, **kwargs)
        key, tensors = _signature(args, kwargs)
        entry = _EAGER if key is None else self.entries.get(key)
        if entry is None and not self.build:
            now = time.monotonic()
            if now - self._looked.get(key, -_RECHECK_SECONDS) >= _RECHECK_SECONDS:
                if self._path(key).exists():
                    entry = self.entries[key] = self._build(key, args, kwargs, tensors)
                self._looked[key] = time.monotonic()  # after the look (its first key reads the versions: slow)
            if entry is None:
                return self.eager(*args, **kwargs)
        elif entry is None:
            entry = self.entries[key] = self._build(key, args, kwargs, tensors)
        if entry is _EAGER:
            return self.eager(*args, **kwargs)
        run, rebuild = entry
        with torch.no_grad():
            return rebuild(_run(run, tensors))

    # --- building ---------------------------------------------------------------------------------------------
    def _cache_key(self, key) -> str:
        import diffusers

        config = dict(getattr(self.module, "config", None) or {})
        params = [(n, tuple(t.shape), str(t.dtype)) for n, t in _tensors(self.module).items()]
        description = {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "cpu": torch.backends.cpu.get_cpu_capability(),
            "class": f"{type(self.module).__module__}.{type(self.module).__qualname__}",
            "method": self.method,
            "config": {k: v for k, v in config.items() if not k.startswith("_")},  # not its path or version
            "architecture": repr(self.module),
            "weights": params,
            "signature": repr(key),
        }
        text = json.dumps(description, sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def _path(self, key) -> Path:
        return cache_dir("aot") / f"{self.label}-{self._cache_key(key)}.pt2"

    def _build(self, key, args, kwargs, tensors):
        with torch.no_grad(), _tracing_eagerly():
            reference = self.eager(*args, **kwargs)
            form = _output_form(reference)
            if form is None:
                return _EAGER
            pick, rebuild = form
            call = _Call(self.module, self.eager, pick).eval()
            path = self._path(key)
            try:
                if not path.exists():
                    self._compile(call, args, kwargs, path)
                run = torch._inductor.aoti_load_package(str(path))
                weights = {f"module.{n}": t for n, t in _tensors(self.module).items()}
                run.load_constants(
                    {n: weights[n] for n in run.get_constant_fqns() if n in weights},
                    check_full_update=False,  # the rest are folded from these at load
                    user_managed=True,  # the module's own tensors, not copies
                )
                got = _run(run, list(tensors))
            except Exception as err:  # an unexportable forward keeps working, eagerly
                logger.warning("%s: running eagerly for this input (%s)", self.label, str(err).splitlines()[0])
                return _EAGER
            if not _agrees(got, pick(reference)):
                logger.warning("%s: the compiled graph disagrees with the eager forward; running eagerly", self.label)
                return _EAGER
        return run, rebuild

    def _compile(self, call: torch.nn.Module, args, kwargs, path: Path) -> None:
        shapes = ", ".join(str(tuple(t.shape)) for t in _signature(args, kwargs)[1])
        print(f"compiling {self.label} for inputs {shapes} (once; cached in {path.parent})", file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        program = torch.export.export(call, tuple(args), dict(kwargs))
        partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.pt2")
        try:
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(partial), inductor_configs=_INDUCTOR_CONFIG
            )
            os.replace(partial, path)  # atomic: a killed compile leaves no half package under the real name
        finally:
            partial.unlink(missing_ok=True)


def compile_forward(
    module: torch.nn.Module, method: str = "forward", label: str | None = None, build: bool = True
) -> FixedShapeForward:
    """Replace ``module.<method>`` on this instance by a :class:`FixedShapeForward`; returns it."""
    fast = FixedShapeForward(module, method, label, build)
    setattr(module, method, fast)
    return fast
