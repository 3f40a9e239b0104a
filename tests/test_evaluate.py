"""lcm eval: metric plumbing (FID Inception, CLIP score, reference statistics), results.json, resuming, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from lcm.cli import main
from lcm.evaluation import run as eval_run
from lcm.evaluation.inception import FIDInception, load_fid_inception, resize_bilinear_tf1
from lcm.evaluation.metrics import Evaluator, FeatureStats, Reference, to_uint8_rgb
from lcm.evaluation.plan import EvalPlan, EvalSettings, Method, plan_eval
from lcm.evaluation.prompts import EMBEDDED, load_prompts
from lcm.evaluation.results import Record, load_results, save_results
from lcm.evaluation.run import nfe_per_image, run_eval
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.sample import Sampler
from lcm.shipped import default_model_path

TEACHER = str(default_model_path())


# --------------------------------------------------------------------------------------------------- FID Inception
def test_tf1_resize_closed_form():
    """TF1 bilinear (no half-pixel centres): output i samples input i·n_in/n_out; the last pixel repeats."""
    x = torch.tensor([[[[0.0, 10.0]]]])
    assert resize_bilinear_tf1(x, (1, 4)).flatten().tolist() == [0.0, 5.0, 10.0, 10.0]
    y = torch.arange(9.0).reshape(1, 1, 3, 3)
    assert torch.equal(resize_bilinear_tf1(y, (3, 3)), y)  # same size: identity
    assert resize_bilinear_tf1(y, (1, 1)).item() == 0.0  # downscale to one pixel samples the first


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """A weights file of the FID Inception's exact layout (random values: no real weights offline)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "weights-inception.pth"
    torch.save(FIDInception().state_dict(), path)
    return path


def test_inception_loads_a_weights_file_and_gives_2048_features(inception_weights):
    model = load_fid_inception(inception_weights)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert model(images).shape == (3, 2048)
    with pytest.raises(ValueError, match="uint8"):
        model(images.float())


def test_missing_inception_weights_give_one_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ValueError, match="--inception-weights PATH") as err:
        load_fid_inception(None)
    assert "weights-inception-2015-12-05" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="no such file"):
        load_fid_inception(tmp_path / "absent.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="do not fit the FID Inception"):
        load_fid_inception(tmp_path / "other.pth")


def test_cli_reports_missing_inception_weights_in_one_line(tmp_path, capsys):
    code = main(
        ["eval", "--teacher-samplers", "ddim", "--teacher-steps", "1", "--num-samples", "4", "--metrics", "fid",
         "--inception-weights", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "out")]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("lcm eval: error: --inception-weights") and "no such file" in err


def _imagefolder(root: Path, n: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"picture number {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_fid_of_a_set_against_itself_is_zero_and_others_are_not(tmp_path, inception_weights):
    """The whole FID path — reference images, uint8 conversion, Inception features, cached statistics."""
    from lcm.data.sources import open_data

    folder = _imagefolder(tmp_path / "ref", 12, seed=1)

    def images():
        data = open_data(str(folder), resolution=32, channels=3)
        yield torch.stack([data[i]["pixel_values"] for i in range(len(data))])

    reference = Reference("test images", images, cache_dir=tmp_path / "cache")
    evaluator = Evaluator(["fid", "kid"], reference, inception_weights=inception_weights)
    same = next(images())
    scores = evaluator.evaluate(same)
    assert abs(scores["fid"]) < 1e-3 * max(1.0, float(evaluator.reference_stats("inception").cov.trace()))
    other = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    assert evaluator.evaluate(other)["fid"] > 100 * abs(scores["fid"])
    assert len(list((tmp_path / "cache").glob("inception-*.safetensors"))) == 1  # statistics cached for the next run
    cached = Evaluator(
        ["fid"], Reference("test images", None, cache_dir=tmp_path / "cache"), inception_weights=inception_weights
    )
    assert cached.evaluate(same)["fid"] == pytest.approx(scores["fid"], abs=1e-6)


def test_reference_statistics_files(tmp_path):
    import numpy as np

    stats = FeatureStats.of(torch.randn(50, 4, generator=torch.Generator().manual_seed(0)))
    stats.save(tmp_path / "s.safetensors")
    back = FeatureStats.load(tmp_path / "s.safetensors")
    assert torch.equal(back.mean, stats.mean) and torch.equal(back.cov, stats.cov)
    np.savez(tmp_path / "fid.npz", mu=stats.mean.numpy(), sigma=stats.cov.numpy())
    from_npz = FeatureStats.load(tmp_path / "fid.npz")
    assert torch.allclose(from_npz.cov, stats.cov) and from_npz.features is None
    np.savez(tmp_path / "bad.npz", m=stats.mean.numpy())
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        FeatureStats.load(tmp_path / "bad.npz")


def test_uint8_conversion():
    x = torch.tensor([-1.0, -0.999, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5)
    out = to_uint8_rgb(x)
    assert out.shape == (1, 3, 1, 5) and out.dtype == torch.uint8
    assert out[0, 0, 0].tolist() == [0, 0, 128, 255, 255]


# -------------------------------------------------------------------------------------------------------- CLIP score
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    from tiny_models import tiny_clip_tokenizer, tiny_text_encoder_config

    torch.manual_seed(3)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    config = CLIPConfig(
        text_config=tiny_text_encoder_config().to_dict(), vision_config=vision.to_dict(), projection_dim=32
    )
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tiny_clip_tokenizer()).save_pretrained(path)
    return path


def test_clip_score_is_100_times_the_mean_cosine(tiny_clip):
    """Against the towers and projections called one by one, image i paired with prompt i, in any batching."""
    from transformers import CLIPModel, CLIPProcessor

    images = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1  # grey, as Fashion
    prompts = [f"a photo of thing {i}" for i in range(6)]
    evaluator = Evaluator(["clip"], clip_model=str(tiny_clip))
    score = evaluator.evaluate(images, prompts=prompts)["clip_score"]

    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    rgb = ((images + 1) * 127.5).round().to(torch.uint8).repeat(1, 3, 1, 1)
    pixels = processor(images=list(rgb), return_tensors="pt")["pixel_values"]
    tokens = processor(text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(model.text_model(**tokens).pooler_output)
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert score == pytest.approx(max(float(100 * cos.mean()), 0.0), abs=1e-3)
    assert evaluator.clip.cosines(images, prompts, batch=4) == pytest.approx(cos, abs=1e-5)
    assert evaluator.clip.cosines(images, prompts[::-1]) != pytest.approx(cos, abs=1e-3)


def test_missing_clip_model_gives_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--clip-model") as err:
        Evaluator(["clip"], clip_model=str(tmp_path / "no-clip-here"))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------------ results.json
def _record(**changes) -> Record:
    base = Record(
        method="LCM",
        model="runs/lcm",
        model_fingerprint="abc",
        sampler="lcm",
        steps=4,
        w=3.0,
        metrics={"fd_clf": 63.9, "prompt_accuracy": 0.959},
        n_samples=2000,
        seconds_per_image=0.0021,
        nfe_per_image=4,
        git_commit="0123abcd",
        lcm_version="0.1.0",
        created="2026-11-26T00:00:00+00:00",
    )
    return replace(base, **changes)


def test_results_json_round_trips(tmp_path):
    settings = EvalSettings(num_samples=2000, metrics=("fd-clf", "accuracy"))
    records = [_record(), _record(method="teacher DDIM", sampler="ddim", steps=25, nfe_per_image=50, git_commit=None)]
    save_results(tmp_path / "results.json", settings, records)
    stored, back = load_results(tmp_path / "results.json")
    assert stored == settings.to_dict() and back == records
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["schema"] == "lcm-eval/1"
    del data["records"][0]["nfe_per_image"]
    (tmp_path / "results.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="nfe_per_image"):
        load_results(tmp_path / "results.json")


def test_nfe_counts_guided_teacher_steps_twice():
    assert nfe_per_image(Sampler.DDIM, 25, 3.0) == 50
    assert nfe_per_image(Sampler.DPM_SOLVER_PP_2M, 8, 0.0) == 8
    assert nfe_per_image(Sampler.LCM, 4, 3.0) == 4
    assert nfe_per_image(Sampler.TCD, 4, 3.0) == 4  # TCD and PCM models take w as an input too
    assert nfe_per_image(Sampler.TCD, 4, 3.0, cfg_free=True) == 8  # real guidance: two calls a step


def test_prompts_from_a_text_file_and_a_data_set(tmp_path):
    (tmp_path / "p.txt").write_text("a red dress\n\n  a sneaker \n")
    prompts = load_prompts(str(tmp_path / "p.txt"), 5, seed=2)
    assert prompts.prompts == ["a red dress", "a sneaker"] * 2 + ["a red dress"] and prompts.labels is None
    assert prompts.seeds == list(range(2_000_000, 2_000_005))
    data = load_prompts(str(_imagefolder(tmp_path / "d", 3, seed=0)), 4)
    assert sorted(set(data.prompts)) == [f"picture number {i}" for i in range(3)]
    with pytest.raises(ValueError, match="no such file"):
        load_prompts(str(tmp_path / "absent.txt"), 3)


# ------------------------------------------------------------------------------------------------------------ plans
def test_plan_defaults_for_the_embedded_teacher(tmp_path):
    plan = plan_eval(out=tmp_path, device="cpu")
    s = plan.settings
    assert s.prompts == EMBEDDED and s.reference == EMBEDDED  # the Fashion captions and the test split
    assert s.metrics == ("fd-clf", "kid-clf", "accuracy") and s.clip_model is None
    assert s.classifier == str(Path(TEACHER) / "classifier")
    assert plan.ws == (LatentDiffusion.from_pretrained(TEACHER, with_text_encoder=False).default_w,)
    assert [(m.name, m.sampler, m.steps) for m in plan.methods] == [
        ("teacher DDIM", Sampler.DDIM, (1, 2, 4, 8, 25, 50)),
        ("teacher DPM-Solver", Sampler.DPM_SOLVER_2M, (1, 2, 4, 8, 25, 50)),
        ("teacher DPM-Solver++", Sampler.DPM_SOLVER_PP_2M, (1, 2, 4, 8, 25, 50)),
    ]


def test_plan_of_another_teacher_needs_prompts_and_scores_clip_without_a_reference(tmp_path):
    teacher = str(tmp_path / "sd")  # only the embedded teacher has a classifier folder
    with pytest.raises(ValueError, match="--prompts is required"):
        plan_eval(out=tmp_path, teacher=teacher, ws=(6.5,))
    plan = plan_eval(out=tmp_path, teacher=teacher, ws=(6.5,), prompts="p.txt", metrics=("clip",), device="cpu")
    assert plan.settings.reference == "none" and plan.settings.classifier is None
    assert plan.settings.clip_model == "openai/clip-vit-large-patch14"
    lcm = plan_eval(out=tmp_path, teacher=teacher, ws=(6.5,), prompts="p.txt", reference="stats.npz",
                    teacher_samplers=(), lcms=[("owner/lcm", None)], device="cpu")  # fmt: skip
    assert [m.name for m in lcm.methods] == ["LCM"] and lcm.settings.metrics == ("fid", "kid", "clip")
    with pytest.raises(ValueError, match="^--reference .*absent: no such file or directory$"):
        plan_eval(out=tmp_path, teacher=teacher, ws=(6.5,), prompts="p.txt", reference=str(tmp_path / "absent"))


# ------------------------------------------------------------------------------------------------------------ runs
def _plan(out: Path, steps=(1,), ws=(3.0,), **settings) -> EvalPlan:
    return EvalPlan(
        methods=(Method("teacher DDIM", TEACHER, Sampler.DDIM, tuple(steps)),),
        ws=tuple(ws),
        settings=EvalSettings(num_samples=20, classifier=str(Path(TEACHER) / "classifier"), **settings),
        out=out,
        batch_size=10,
    )


def test_a_resumed_eval_reuses_finished_rows(tmp_path, monkeypatch):
    first = run_eval(_plan(tmp_path), progress=False)
    assert [(r.method, r.steps, r.w) for r in first] == [("teacher DDIM", 1, 3.0)]
    assert first[0].n_samples == 20 and set(first[0].metrics) == {"fd_clf", "kid_clf", "prompt_accuracy"}

    calls = []
    real = eval_run.generate

    def counting(model, prompts, sampler, steps, *args, **kwargs):
        calls.append(steps)
        return real(model, prompts, sampler, steps, *args, **kwargs)

    monkeypatch.setattr(eval_run, "generate", counting)
    again = run_eval(_plan(tmp_path, steps=(1, 2)), progress=False)
    assert set(calls) == {2}  # only the new row was sampled (warm-up included)
    assert again[0] == first[0]
    report = (tmp_path / "results.md").read_text()
    assert "| teacher DDIM |" in report and "not FID" in report
    assert (tmp_path / "steps.png").stat().st_size > 0

    with pytest.raises(ValueError, match="other settings .*seed"):
        run_eval(replace(_plan(tmp_path), settings=replace(_plan(tmp_path).settings, seed=1)), progress=False)


def test_cli_eval_with_a_w_sweep(tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", "--teacher-samplers", "ddim", "--teacher-steps", "1", "--num-samples", "20", "--batch-size", "10"]
    assert main([*args, "--sweep-w", "1,3", "--out", str(out)]) == 0
    stored, records = load_results(out / "results.json")
    assert [(r.steps, r.w) for r in records] == [(1, 1.0), (1, 3.0)]
    assert stored["metrics"] == ["fd-clf", "kid-clf", "accuracy"] and stored["teacher_spacing"] == "trailing"
    assert records[0].metrics != records[1].metrics  # w reaches the sampler
    for name in ("results.md", "steps_w1.png", "steps_w3.png", "w_sweep.png"):
        assert (out / name).is_file(), name
    assert "## w = 1" in (out / "results.md").read_text()


def _as_tcd(tmp_path: Path) -> Path:
    """The shipped LCM's folder, its record saying it was distilled with --method tcd (it then samples with TCD's)."""
    import shutil

    import lcm.shipped

    folder = tmp_path / "tcd"
    shutil.copytree(lcm.shipped.ASSETS / "fashion-lcm", folder)
    record = json.loads((folder / "lcm_distill.json").read_text())
    record["lcd"]["consistency"] = "tcd"
    (folder / "lcm_distill.json").write_text(json.dumps(record))
    return folder


def test_eval_samples_tcd_models_at_the_given_gamma(tmp_path, monkeypatch, capsys):
    tcd, lcm = str(_as_tcd(tmp_path)), str(Path(TEACHER).parent / "fashion-lcm")
    plan = plan_eval(out=tmp_path, teacher_samplers=(), lcms=[(tcd, None), (lcm, "LCM")], gamma=1, device="cpu")
    assert [(m.name, m.sampler, m.gamma) for m in plan.methods] == [
        ("TCD (tcd) γ 1", Sampler.TCD, 1.0),
        ("LCM", Sampler.LCM, None),  # γ is TCD's sampler's only
    ]
    assert plan_eval(out=tmp_path, teacher_samplers=(), lcms=[(tcd, None)], device="cpu").methods[0].gamma is None

    calls = []
    real = eval_run.generate

    def recording(model, prompts, sampler, steps, *args, gamma, **kwargs):
        calls.append((sampler, gamma))
        return real(model, prompts, sampler, steps, *args, gamma=gamma, **kwargs)

    monkeypatch.setattr(eval_run, "generate", recording)
    args = ["eval", "--lcm", tcd, "--teacher-samplers", "", "--lcm-steps", "2", "--num-samples", "4"]
    assert main([*args, "--batch-size", "4", "--gamma", "1", "--out", str(tmp_path / "e")]) == 0
    assert set(calls) == {(Sampler.TCD, 1.0)}
    assert [r.method for r in load_results(tmp_path / "e" / "results.json")[1]] == ["TCD γ 1"]
    calls.clear()
    assert main([*args, "--batch-size", "4", "--out", str(tmp_path / "d")]) == 0
    assert set(calls) == {(Sampler.TCD, 0.3)}  # the model's own
    capsys.readouterr()

    for extra, message in (
        (["--lcm", lcm, "--gamma", "0.5"], "--gamma is TCD's sampler's"),
        (["--lcm", tcd, "--gamma", "1.5"], "--gamma must be between 0 and 1, got 1.5"),
    ):
        assert main(["eval", "--out", str(tmp_path / "o"), "--teacher-samplers", "", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--teacher-samplers", "euler"], "unknown sampler"),
        (["--teacher-steps", "0"], "at least 1"),
        (["--sweep-w", "1,x"], "comma-separated numbers"),
        (["--metrics", "fid,inception-score"], "unknown metric"),
        (["--prompts", "prompts.txt", "--metrics", "accuracy"], "needs --prompts embedded"),
        (["--num-samples", "1"], "--num-samples must be between 2 and"),
        (["--prompts", "prompts.txt", "--metrics", "fid"], "--reference is required"),
        (["--teacher-samplers", ""], "nothing to evaluate"),
    ],
)
def test_cli_eval_rejects_bad_input(tmp_path, capsys, extra, message):
    assert main(["eval", "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_eval_of_a_stable_diffusion_teacher_and_its_lcm_lora_with_fid_and_clip(
    tiny_sd, tmp_path, inception_weights, tiny_clip, capsys
):
    """The non-embedded path end to end: an SD-shaped teacher, an LCM-LoRA made by lcm distill, prompts from a text
    file, FID/KID against a folder of images and CLIP score."""

    teacher = tiny_sd
    data = _imagefolder(tmp_path / "data", 8, seed=2)
    lora = tmp_path / "lora"
    distill = ["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(lora), "--student", "lora"]
    assert main([*distill, "--lora-rank", "4", "--max-steps", "2", "--batch-size", "2"]) == 0
    (tmp_path / "prompts.txt").write_text("a cabin in the snow\na red bicycle\n")
    out = tmp_path / "eval"
    args = ["eval", "--teacher", str(teacher), "--lcm", f"{lora}=LCM-LoRA", "--teacher-samplers", "dpmpp"]
    args += ["--teacher-steps", "2", "--lcm-steps", "1", "--num-samples", "6", "--batch-size", "3", "--w", "6.5"]
    reference = tmp_path / "reference"  # a plain folder of images: no captions needed
    reference.mkdir()
    for f in data.glob("*.png"):
        (reference / f.name).write_bytes(f.read_bytes())
    args += ["--prompts", str(tmp_path / "prompts.txt"), "--reference", str(reference), "--out", str(out)]
    args += ["--inception-weights", str(inception_weights), "--clip-model", str(tiny_clip)]
    assert main(args) == 0, capsys.readouterr().err
    settings, records = load_results(out / "results.json")
    assert settings["metrics"] == ["fid", "kid", "clip"] and settings["reference"] == str(reference)
    assert [(r.method, r.sampler, r.steps, r.nfe_per_image) for r in records] == [
        ("teacher DPM-Solver++", "dpmpp", 2, 4),
        ("LCM-LoRA", "lcm", 1, 1),
    ]
    for r in records:
        assert set(r.metrics) == {"fid", "kid", "clip_score"} and r.n_samples == 6
        assert all(map(torch.isfinite, map(torch.tensor, r.metrics.values())))
    assert "### FID ↓" in (out / "results.md").read_text()


def test_ablation_script_smoke(tmp_path, monkeypatch, capsys):
    """scripts/ablation.py end to end at a toy budget: runs, resumable results in lcm eval's schema, table, plot."""
    import runpy
    import sys

    script = str(Path(__file__).parents[1] / "scripts" / "ablation.py")
    argv = ["ablation.py", "--out", str(tmp_path), "--k", "50", "--solvers", "ddim", "dpmpp", "--max-steps", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--steps", "1", "--samples", "20"])
    runpy.run_path(script, run_name="__main__")
    for solver in ("ddim", "dpmpp"):
        settings, records = load_results(tmp_path / f"{solver}-k50" / "results.json")
        assert settings["num_samples"] == 20 and [(r.method, r.steps) for r in records] == [(f"LCM {solver} k=50", 1)]
        assert json.loads((tmp_path / f"{solver}-k50" / "results.json").read_text())["k"] == 50
    assert (tmp_path / "ablation.png").stat().st_size > 0
    assert "| ddim | 50 |" in (tmp_path / "ablation.md").read_text()
    capsys.readouterr()
    runpy.run_path(script, run_name="__main__")  # finished runs and rows are kept, not retrained or rescored
    assert "ddim-k50:" not in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", [*argv[:-1], "3", "--steps", "1", "--samples", "20"])
    with pytest.raises(SystemExit, match="distilled for 2 steps, not --max-steps 3"):
        runpy.run_path(script, run_name="__main__")


def test_evaluation_encodes_each_distinct_prompt_once_before_sampling(tmp_path):
    """Rows repeat their prompts: after fill_prompt_cache no row calls the text encoder again, and the images equal
    those drawn with the prompts encoded in batches, as lcm sample does."""
    from lcm.evaluation.prompts import EvalPrompts
    from lcm.sample import generate
    from tiny_models import build_tiny_sd

    model = LatentDiffusion.from_pretrained(build_tiny_sd(tmp_path / "sd"))
    prompts = EvalPrompts(["a cat", "a dog", "a cat", "a red car", "a dog", "a cat"], None, list(range(6)))
    encoded: list[list[str]] = []
    encode = model.text_encoder.encode
    model.text_encoder.encode = lambda p: encoded.append(list(p)) or encode(p)

    assert eval_run.fill_prompt_cache(model, prompts)
    assert sorted(map(tuple, encoded)) == [("",), ("a cat",), ("a dog",), ("a red car",)]  # each alone, once
    encoded.clear()
    for steps in (1, 2):  # two rows
        cached = generate(model, prompts.prompts, Sampler.DDIM, steps, 3.0, prompts.seeds, 4, cache_prompts=True)
        assert encoded == []
        batched = generate(model, prompts.prompts, Sampler.DDIM, steps, 3.0, prompts.seeds, 4)
        torch.testing.assert_close(cached, batched, atol=1e-4, rtol=0)
        encoded.clear()  # the batched reference did encode
