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
