"""Device, precision and compilation of a loaded model: the fast path draws what the eager path draws."""

import os

import pytest
import torch

from lcm.cli import main
from lcm.locations import cache_dir
from lcm.models.aot import FixedShapeForward
from lcm.models.export import export_lcm_folder
from lcm.models.fast import Compile, optimize, parse_device, parse_dtype
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.student import full_student
from lcm.sample import Sampler, sample_latents
from tiny_models import build_tiny_sd


def _tiny_lcm(root, seed: int):
    teacher = LatentDiffusion.from_pretrained(build_tiny_sd(root / "teacher", seed=seed), with_text_encoder=False)
    student = full_student(teacher.unet)
    with torch.no_grad():  # a w input that matters
        student.time_embedding.cond_proj.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    return export_lcm_folder(root / "teacher", student.eval(), teacher.scheduler_config, 50, root / "lcm", {})


@pytest.fixture(scope="module")
def tiny_lcm(tmp_path_factory):
    return _tiny_lcm(tmp_path_factory.mktemp("fast"), seed=0)


def _draw(model, steps=4, w=4.0, seeds=(0, 1)):
    cond = model.encode_prompts(["a photo of a cat", "a red car"][: len(seeds)])
    return model.decode(sample_latents(model, cond, cond, Sampler.LCM, steps, w, list(seeds)))


def test_compiled_sampling_equals_eager(tiny_lcm, parity):
    eager = _draw(LatentDiffusion.from_pretrained(tiny_lcm))
    compiled = optimize(LatentDiffusion.from_pretrained(tiny_lcm), torch.device("cpu"), torch.float32, Compile.ON)
    parity(_draw(compiled), eager, tol=1e-4, label="compile-vs-eager")
    # not an eager fallback: the LCM step (UNet and boundary arithmetic as one graph) and the decoder ran compiled;
    # the UNet's own package, which only the teacher samplers call, was never built
    assert compiled.consistency_step.forward.compiled == 1 and compiled.vae.decode.compiled == 1
    assert compiled.unet.forward.compiled == 0
    parity(_draw(compiled, seeds=(3, 4)), _draw(LatentDiffusion.from_pretrained(tiny_lcm), seeds=(3, 4)), 1e-4, "again")


def test_compiled_package_runs_each_models_own_weights(tiny_lcm, tmp_path, parity):
    """One package per architecture and shape: a model with other weights reuses it (no compile) and still draws
    its own images, not the images of the weights the package was compiled with."""
    first = optimize(LatentDiffusion.from_pretrained(tiny_lcm), torch.device("cpu"), torch.float32, Compile.ON)
    first_images = _draw(first)  # compiles, or loads what the test above compiled
    packages = sorted(cache_dir("aot").glob("*.pt2"))
    other = _tiny_lcm(tmp_path, seed=1)
    compiled = optimize(LatentDiffusion.from_pretrained(other), torch.device("cpu"), torch.float32, Compile.ON)
    images = _draw(compiled)
    assert sorted(cache_dir("aot").glob("*.pt2")) == packages and compiled.consistency_step.forward.compiled == 1
    parity(images, _draw(LatentDiffusion.from_pretrained(other)), tol=1e-4, label="other-weights")
    assert (images - first_images).abs().mean() > 0.01


def test_a_forward_inside_a_package_being_built_runs_eagerly():
    """A compiled step calls a UNet whose forward is compiled too: while the step's package is built, the inner
    forward must run its eager code (so that the export holds the network), and build nothing of its own."""
    from lcm.models.aot import _tracing_eagerly

    inner = FixedShapeForward(torch.nn.Linear(3, 2))
    x = torch.ones(1, 3)
    with _tracing_eagerly():
        assert torch.equal(inner(x), inner.eager(x))
    assert not inner.entries


def test_arguments_it_cannot_describe_run_eagerly():
    marker = object()  # neither a tensor nor a plain value: no signature, so no package
    fast = FixedShapeForward(torch.nn.Identity())
    assert fast(marker) is marker and fast.compiled == 0 and not fast.entries


def test_bfloat16_sampling_is_close_to_float32(tiny_lcm):
    eager = _draw(LatentDiffusion.from_pretrained(tiny_lcm))
    half = optimize(LatentDiffusion.from_pretrained(tiny_lcm), torch.device("cpu"), torch.bfloat16, Compile.OFF)
    assert half.unet.dtype == torch.bfloat16
    images = _draw(half)
    assert images.dtype == torch.float32 and (images - eager).abs().mean() < 0.05


def test_vae_upcast_only_in_fp16(tiny_lcm):
    """diffusers' rule: SD's VAE (``force_upcast``) overflows in fp16 and decodes in float32 there; bf16 has float32's
    range, so the VAE runs in bf16 like the UNet."""
    for dtype, vae_dtype in ((torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)):
        model = LatentDiffusion.from_pretrained(tiny_lcm)
        assert model.vae.config.force_upcast
        optimize(model, torch.device("cpu"), dtype, Compile.OFF)
        assert (model.unet.dtype, model.vae.dtype) == (dtype, vae_dtype)


def test_device_and_dtype_flags_are_checked():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_dtype(None, torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="--dtype"):
        parse_dtype("fp8", torch.device("cpu"))
    with pytest.raises(ValueError, match="--device"):
        parse_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            parse_device("cuda")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--steps", "0"], "--steps must be between 1 and 1000"),
        (["--guidance", "-5"], "--guidance"),
        (["--num-images", "0"], "--num-images"),
        (["--batch-size", "0"], "--batch-size"),
        (["--dtype", "fp16", "--device", "nonsense"], "--device"),
    ],
)
def test_sample_refuses_bad_values(args, message, tmp_path, capsys):
    assert main(["sample", "--prompt", "a cat", "--out", str(tmp_path / "x.png"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lcm sample: error:") and message in err[0], err


def test_compile_cache_is_lcm_cache_unless_the_user_names_one(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    from lcm.models.fast import use_compile_cache

    monkeypatch.setenv("LCM_CACHE", str(tmp_path / "lcm"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    inductor_cache_dir()  # what loading a diffusers model does: Inductor writes its /tmp default into the environment
    use_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "lcm" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    use_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def test_auto_compiles_only_on_cuda():
    assert Compile.AUTO.enabled(torch.device("cuda")) and not Compile.AUTO.enabled(torch.device("cpu"))
    assert Compile.ON.enabled(torch.device("cpu")) and not Compile.OFF.enabled(torch.device("cuda"))


def test_a_forward_that_does_not_build_runs_packages_as_they_appear(monkeypatch, tmp_path):
    """``build=False`` (``lcm serve`` on the CPU): eager and nothing built while the cache lacks the package; the
    package another process writes is used from the next look at the cache on (at most one look a second)."""
    import lcm.models.aot as aot

    monkeypatch.setenv("LCM_CACHE", str(tmp_path))
    built = []

    def fake_build(self, key, args, kwargs, tensors):  # what loading a package returns: (package, rebuild)
        built.append(key)
        return "package", lambda out: out * 0 + 7

    monkeypatch.setattr(aot.FixedShapeForward, "_build", fake_build)
    monkeypatch.setattr(aot, "_run", lambda package, tensors: tensors[0])
    fast, x = aot.FixedShapeForward(torch.nn.Linear(3, 2), build=False), torch.ones(1, 3)
    assert torch.equal(fast(x), fast.eager(x)) and not built and fast.compiled == 0
    path = fast._path(aot._signature((x,), {})[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()  # another process finished the package
    assert torch.equal(fast(x), fast.eager(x)) and not built  # looked less than a second ago: still eager
    monkeypatch.setattr(aot, "_RECHECK_SECONDS", 0.0)
    assert torch.equal(fast(x), torch.full((1, 3), 7.0)) and len(built) == 1 and fast.compiled == 1
    assert torch.equal(fast(x), torch.full((1, 3), 7.0)) and len(built) == 1  # loaded once


@pytest.mark.slow
def test_serve_answers_at_once_and_switches_to_what_another_process_compiles(monkeypatch, tmp_path):
    """``lcm serve --compile on`` on the CPU: the engine is eager while a background ``lcm sample --compile on``
    fills an empty AOT cache, then runs the packages, drawing what the eager engine draws."""
    import time

    from lcm.serve.engine import load_engine
    from lcm.serve.protocol import Request
    from lcm.shipped import default_sampling_path

    monkeypatch.setenv("LCM_CACHE", str(tmp_path / "cache"))
    cpu = torch.device("cpu")
    engine = load_engine(default_sampling_path(), cpu, torch.float32, "on")
    eager = load_engine(default_sampling_path(), cpu, torch.float32, "off")
    request = Request(1, "a coat", "", 4, 3.0, 5, 1)
    assert engine.compile_status() == "building" and engine.background.running
    first = engine.run(request)
    deadline = time.monotonic() + 600
    while engine.background.running and time.monotonic() < deadline:
        time.sleep(1)
    assert not engine.background.failed, engine.background.last_line()
    time.sleep(1.1)  # the forwards look at the cache at most once a second
    compiled = engine.run(request)
    assert engine.compile_status() == "on" and engine.info()["compile"] == "on"
    expected = eager.run(request).pngs
    assert first.pngs == expected  # eager while building: the same PNG bytes
    from lcm.images import decode_image_bytes

    got, want = (decode_image_bytes(p, 1) for p in (compiled.pngs[0], expected[0]))
    assert (got - want).abs().max() <= 2 / 255 * 2  # compiled: within a level or two of 255
    again = load_engine(default_sampling_path(), cpu, torch.float32, "on")  # a second start: the cache at once
    assert again.background is None and again.compile_status() == "on"
