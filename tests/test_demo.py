"""The shipped teacher and the main job: ``lcm sample`` without --model, and ``lcm demo --quick``."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lcm.cli import main
from lcm.data.captions import class_prompts
from lcm.data.fashion_mnist import DEBIAN_DIR
from lcm.evaluation.metrics import FashionEvaluator
from lcm.evaluation.results import load_results
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.sample import Sampler, generate
from lcm.shipped import default_model_path

needs_data = pytest.mark.skipif(
    not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="needs the Debian package dataset-fashion-mnist"
)


def test_shipped_teacher_is_a_diffusers_folder_under_25_mb():
    path = default_model_path()
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert size < 25e6, size
    card = (path / "README.md").read_text()
    assert "lcm train-teacher" in card and "seed" in card


def test_shipped_teacher_draws_the_prompted_garment():
    """Prompts (and paraphrases) of every class are drawn as that class, by the shipped classifier's judgement."""
    path = default_model_path()
    model = LatentDiffusion.from_pretrained(path)
    classifier = FashionEvaluator(path / "classifier").classifier
    prompts = [
        "a photo of a t-shirt",
        "trousers",
        "a knitted sweater",
        "a summer dress",
        "a winter coat",
        "a sandal",
        "a shirt",
        "running shoes",
        "a handbag",
        "an ankle boot",
    ]
    images = generate(model, prompts * 3, Sampler.DDIM, 25, 3.0, list(range(30)))
    with torch.no_grad():
        predicted = classifier(images).argmax(1)
    accuracy = (predicted == torch.arange(10).repeat(3)).float().mean().item()
    assert accuracy >= 0.7, (accuracy, predicted.tolist())


def test_sample_without_model_uses_the_shipped_lcm(tmp_path):
    out = tmp_path / "pngs"
    assert main(["sample", "--prompt", "running shoes", "--num-images", "2", "--steps", "4", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000-seed0.png", "001-seed1.png"]
    info = Image.open(out / "000-seed0.png").info
    assert Path(info["model"]).name == "fashion-lcm" and info["sampler"] == "lcm", info


@needs_data
def test_demo_quick_writes_grid_table_and_model(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    settings, records = load_results(out / "results.json")  # lcm eval's schema
    assert settings["num_samples"] == 100 and settings["seed"] == 0
    assert [(r.method, r.steps) for r in records] == [(m, s) for m in ("teacher DDIM", "LCM") for s in (1, 2, 4, 8)]
    assert {r.model for r in records} == {str(default_model_path()), str(out / "lcm")}
    rows = {(r.method, r.steps): r.metrics for r in records}
    # The teacher rows measure something: 8 DDIM steps are far better than 1 by the shipped classifier (at 100 images
    # per row the full-size figures are 1 step ~ 1090 / 0.10, 8 steps ~ 66 / 0.95; a broken sampler or metric fails).
    one, eight = rows["teacher DDIM", 1], rows["teacher DDIM", 8]
    assert eight["fd_clf"] < one["fd_clf"] / 3 and eight["prompt_accuracy"] > one["prompt_accuracy"] + 0.2, (one, eight)
    assert eight["prompt_accuracy"] > 0.8, eight
    assert [r.nfe_per_image for r in records] == [2, 4, 8, 16, 1, 2, 4, 8]
    # the Markdown table is the JSON's numbers
    table = (out / "results.md").read_text()
    for r in records:
        assert f"| {r.method} | {r.steps} | {r.nfe_per_image} | {r.metrics['fd_clf']:.1f} |" in table
    assert (out / "demo_grid.png").is_file()
    lcm = LatentDiffusion.from_pretrained(out / "lcm")
    assert lcm.is_lcm and lcm.w_range == (1.0, 5.0) and lcm.default_w == 3.0
    assert lcm.scheduler_config["original_inference_steps"] == 10  # the recipe's skipping step k = 100
    run = json.loads((out / "lcm" / "train" / "run_config.json").read_text())
    assert run["method"]["w_lr_scale"] == 10.0 and run["method"]["num_solver_steps"] == 10


def test_demo_recipes_differ_only_in_length_evaluation_and_speed(tmp_path):
    from lcm.config.knobs import leaves
    from lcm.demo import demo_config

    demo, long = demo_config(tmp_path, "demo"), demo_config(tmp_path, "long")
    a, b = ({p: v for p, _, v in leaves(d.run)} for d in (demo, long))
    changed = {p for p in a if a[p] != b[p]}
    # compiling changes the speed, not the maths; how often a run writes and logs changes neither
    assert changed == {"loop.max_steps", "loop.compile", "loop.checkpoint_every", "loop.log_every"}
    assert long.run.loop.max_steps > 6 * demo.run.loop.max_steps and long.eval_samples == 2 * demo.eval_samples
    assert demo.run.optim.lr_schedule == "cosine_floor" and demo.run.optim.lr_warmup_steps == 100  # docs/fidelity.md
    assert demo_config(tmp_path, "long", {"loop.max_steps": 10}).run.loop.max_steps == 10  # a flag overrides
    with pytest.raises(ValueError, match="unknown recipe"):
        demo_config(tmp_path, "longer")


def test_shipped_lcm_is_a_w_conditioned_lcm_and_the_shipped_weights_stay_small():
    from lcm.shipped import default_sampling_path

    path = default_sampling_path()
    assert path.name == "fashion-lcm"
    model = LatentDiffusion.from_pretrained(path)
    assert model.is_lcm and model.w_range == (1.0, 5.0) and model.default_w == 3.0
    assets = Path(default_model_path()).parent
    total = sum(f.stat().st_size for f in assets.rglob("*") if f.is_file())
    assert total <= 25 * 2**20, f"shipped weights and cards take {total / 2**20:.1f} MiB (limit 25)"


def test_shipped_flow_teacher_draws_the_prompted_garment():
    """The embedded flow-matching teacher (an MMDiT on the same VAE) draws each prompted class with Euler 25 steps,
    by the shipped classifier's judgement; its folder is an SD3-layout diffusers folder with a model card."""
    from lcm.shipped import embedded_classifier, flow_teacher_path

    path = flow_teacher_path()
    card = (path / "README.md").read_text()
    assert "lcm train-teacher --objective flow" in card and "seed" in card
    model = LatentDiffusion.from_pretrained(path)
    assert model.is_flow and not model.is_lcm and type(model.unet).__name__ == "SD3Transformer2DModel"
    classifier = FashionEvaluator(embedded_classifier(path)).classifier
    images = generate(model, class_prompts() * 3, Sampler.DDIM, 25, 3.0, list(range(30)))
    with torch.no_grad():
        predicted = classifier(images).argmax(1)
    accuracy = (predicted == torch.arange(10).repeat(3)).float().mean().item()
    assert accuracy >= 0.7, (accuracy, predicted.tolist())


CLASSES = [
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]


def test_demo_of_the_flow_teacher_takes_the_flow_overrides(tmp_path):
    """``lcm demo --teacher flow``'s tree: the recipe, then the flow overrides (one w, Heun), then the user's flags."""
    from lcm.config.recipes import FLOW
    from lcm.demo import demo_config
    from lcm.shipped import flow_teacher_path

    flow = demo_config(tmp_path, "demo", None, None, flow_teacher_path()).run
    plain = demo_config(tmp_path, "demo").run
    assert flow.model == str(flow_teacher_path()) and plain.model is None
    method = flow.method
    assert (method.w_min, method.w_max, method.solver.value) == (3.0, 3.0, "heun") == tuple(FLOW.values())
    assert (plain.method.w_min, plain.method.w_max, plain.method.solver.value) == (1.0, 5.0, "ddim")
    assert flow.loop.max_steps == plain.loop.max_steps  # the same budget
    flags = demo_config(tmp_path, "demo", {"method.solver": "ddim"}, None, flow_teacher_path()).run
    assert flags.method.solver.value == "ddim"


@pytest.mark.slow
@needs_data
def test_demo_flow_quick_distils_the_flow_teacher(tmp_path):
    from lcm.shipped import flow_teacher_path

    out = tmp_path / "demo"
    assert main(["demo", "--teacher", "flow", "--quick", "--eval-samples", "40", "--out", str(out)]) == 0
    _, records = load_results(out / "results.json")
    assert [(r.method, r.steps) for r in records] == [(m, s) for m in ("teacher Euler", "LCM") for s in (1, 2, 4, 8)]
    assert {r.model for r in records} == {str(flow_teacher_path()), str(out / "lcm")}
    lcm = LatentDiffusion.from_pretrained(out / "lcm")
    assert lcm.is_flow and lcm.is_lcm and lcm.w_range == (3.0, 3.0)
    assert lcm.scheduler_config["_class_name"] == "FlowMatchLCMScheduler"
    assert "flow-matching" in (out / "results.md").read_text()
