"""The sampling options: negative prompt and negative guidance, output size, TCD and img2img through ``lcm sample``
and ``lcm serve``, the PNGs ``lcm sample`` writes (metadata, labelled grid) and the labelled grids of ``lcm demo`` and
of training validation. The diffusers parity of img2img and TCD is in test_img2img_tcd_parity.py."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, TCDScheduler
from PIL import Image

from lcm.cli import main
from lcm.data.captions import class_prompts
from lcm.evaluation.run import row_record
from lcm.images import labelled_grid, load_image, save_image, to_uint8
from lcm.maths.guidance import guidance_scale_from_w, w_embedding
from lcm.maths.sampling import randn_per_image
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.models.text import TextEmbeddings
from lcm.sample import Sampler, generate, img2img_latents, sample_latents
from lcm.shipped import default_model_path
from test_img2img_tcd_parity import SD, contexts, tiny_unet, tiny_vae

SEEDS = [5, 6, 7]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher() -> LatentDiffusion:
    return LatentDiffusion.from_pretrained(default_model_path())


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory, teacher) -> Path:
    """The shipped teacher as a w-conditioned LCM folder (zero-initialised w projection; no training needed)."""
    from lcm.models.export import export_lcm_folder
    from lcm.models.student import full_student

    out = tmp_path_factory.mktemp("options") / "lcm"
    student = full_student(teacher.unet).eval()
    return export_lcm_folder(default_model_path(), student, teacher.scheduler_config, 50, out, {"test": True})


@pytest.fixture(scope="module")
def lcm_model(lcm_folder) -> LatentDiffusion:
    return LatentDiffusion.from_pretrained(lcm_folder)


def tiny_model(scheduler) -> LatentDiffusion:
    return LatentDiffusion(tiny_unet(True), tiny_vae(), dict(scheduler.config), text_encoder=None)


# --- negative guidance, size --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["lcm", "tcd"])
def test_negative_guidance_is_cfg_of_two_unet_calls_against_diffusers_schedulers(sampler, parity):
    """LCM/TCD with negative guidance S: diffusers' LCMScheduler / TCDScheduler stepped with the UNet's outputs on
    the prompt and on the negative prompt combined as out_c + S·(out_c − out_n), both at the LCM's w-embedding."""
    cond, negative = contexts()
    scheduler_cls = LCMScheduler if sampler == "lcm" else TCDScheduler
    model = tiny_model(scheduler_cls(**SD))
    w, s, steps = 3.0, 1.5, 4
    emb = w_embedding(torch.full((len(SEEDS),), w))
    sched = scheduler_cls(**SD)
    sched.set_timesteps(steps)
    gens = [torch.Generator().manual_seed(x) for x in SEEDS]
    latents = randn_per_image((len(SEEDS), 4, 8, 8), gens)
    with torch.no_grad():
        for t in sched.timesteps:
            out_c = model.unet(latents, t, encoder_hidden_states=cond, timestep_cond=emb).sample
            out_n = model.unet(latents, t, encoder_hidden_states=negative, timestep_cond=emb).sample
            out = out_c + s * (out_c - out_n)
            extra = {"eta": 0.3} if sampler == "tcd" else {}
            latents, denoised = sched.step(out, t, latents, generator=gens, return_dict=False, **extra)
    ref = denoised if sampler == "lcm" else latents
    args = (model, TextEmbeddings(cond), TextEmbeddings(negative), Sampler(sampler), steps, w, SEEDS)
    ours = sample_latents(*args, negative_guidance=s)
    parity(ours, ref, label=sampler)
    plain = sample_latents(*args, negative_guidance=0.0)  # S = 0: the plain one-call sampler, negative unused
    alone = sample_latents(model, TextEmbeddings(cond), None, Sampler(sampler), steps, w, SEEDS)
    torch.testing.assert_close(plain, alone, rtol=0, atol=0)
    assert (ours - plain).abs().max() > 1e-3


def test_size_gives_the_pipelines_latents(parity):
    """Non-square ``size``: our LCM latents against LatentConsistencyModelPipeline at the same height and width."""
    cond, _ = contexts()
    model = tiny_model(LCMScheduler(**SD))
    pipe = LatentConsistencyModelPipeline(
        vae=model.vae,
        text_encoder=None,
        tokenizer=None,
        unet=model.unet,
        scheduler=LCMScheduler(**SD),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    height, width, w = 16, 24, 2.0
    ref = pipe(
        prompt_embeds=cond,
        num_inference_steps=2,
        guidance_scale=guidance_scale_from_w(w),
        height=height,
        width=width,
        generator=[torch.Generator().manual_seed(x) for x in SEEDS],
        output_type="latent",
    ).images
    ours = sample_latents(model, TextEmbeddings(cond), None, Sampler.LCM, 2, w, SEEDS, size=(height, width))
    assert ours.shape == (3, 4, 8, 12)
    parity(ours, ref, label="16x24")
    with pytest.raises(ValueError, match="multiples of this model's VAE scale factor 2"):
        sample_latents(model, TextEmbeddings(cond), None, Sampler.LCM, 2, w, SEEDS, size=(16, 23))


def test_teacher_negative_prompt_is_the_unconditional_side(teacher):
    """``generate(negative_prompt=)`` guides a teacher away from it: the images of sampling with the negative
    prompt's embeddings as ``uncond``, different from those against the empty prompt."""
    prompts, seeds = ["a photo of a shirt"] * 2, [0, 1]
    with torch.no_grad():
        got = generate(teacher, prompts, Sampler.DDIM, 3, 3.0, seeds, negative_prompt="a photo of a t-shirt")
        cond = teacher.encode_prompts(prompts)
        uncond = teacher.encode_prompts(["a photo of a t-shirt"] * 2)
        want = teacher.decode(sample_latents(teacher, cond, uncond, Sampler.DDIM, 3, 3.0, seeds)).cpu()
        empty = generate(teacher, prompts, Sampler.DDIM, 3, 3.0, seeds)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got - empty).abs().max() > 0.05
    with pytest.raises(ValueError, match="negative guidance is for LCMs|--negative-guidance is for LCMs"):
        generate(teacher, prompts, Sampler.DDIM, 3, 3.0, seeds, negative_guidance=1.0)
    with pytest.raises(ValueError, match="needs an LCM"):
        generate(teacher, prompts, Sampler.TCD, 3, 3.0, seeds)


# --- lcm sample ------------------------------------------------------------------------------------------------------
def _png(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def _image_file(path: Path, size=(40, 50)) -> Path:
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def test_sample_flags_are_checked_before_any_model_loads(monkeypatch, tmp_path, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")

    monkeypatch.setattr(LatentDiffusion, "from_pretrained", no_loading)
    (tmp_path / "notes.txt").write_text("not an image")
    image = str(_image_file(tmp_path / "in.png"))
    bad = [
        (["--sampler", "tcd", "--gamma", "1.5"], "--gamma must be between 0 and 1, got 1.5"),
        (["--gamma", "0.3"], "--gamma is the TCD sampler's"),
        (["--sampler", "lcm", "--gamma", "0.3"], "--gamma is the TCD sampler's"),
        (["--negative-guidance", "-1"], "--negative-guidance must be >= 0"),
        (["--negative-guidance", "nan"], "--negative-guidance must be a finite number"),
        (["--negative-guidance", "1", "--sampler", "ddim"], "--negative-guidance is for LCMs"),
        (["--strength", "0.5"], "--strength needs --image"),
        (["--image", image, "--strength", "0"], "--strength must be > 0 and <= 1"),
        (["--image", image, "--strength", "1.5"], "--strength must be"),
        (["--image", str(tmp_path / "missing.png")], "no such file"),
        (["--image", str(tmp_path / "notes.txt")], "not a readable image"),
        (["--height", "30"], "--height must be a multiple of this model's VAE scale factor 4"),
        (["--width", "0"], "--width must be between 1 and 8192"),
        (["--out", str(tmp_path / "one.png")], "names one PNG but 8 images"),
        (["--out", str(tmp_path / "x.jpg")], "--out must be a folder or a .png file"),
        (["--grid", str(tmp_path / "g.jpg")], "--grid writes a PNG"),
        (["--scale", "0"], "--scale must be between 1 and 64"),
        (["--lora-scale", "0.5"], "--lora-scale needs --lora"),
    ]
    for args, message in bad:
        assert main(["sample", "--prompt", "a bag", "--out", str(tmp_path / "o"), *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lcm sample: error:") and message in err[0], (args, err)


def test_sample_writes_one_png_per_image_with_metadata_and_a_labelled_grid(tmp_path, capsys, teacher):
    out = tmp_path / "pngs"
    args = [
        "sample",
        "--model",
        str(default_model_path()),
        "--prompt",
        "a photo of a shirt",
        "--prompt",
        "a bag",
        "--num-images",
        "2",
        "--steps",
        "3",
    ]
    args += ["--negative-prompt", "long sleeves", "--seed", "4", "--scale", "2", "--out", str(out), "--grid"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "4 images (ddim, 3 steps, w=3) written to" in printed and "grid (2 rows of prompts, 2 columns" in printed
    prompts, seeds = ["a photo of a shirt"] * 2 + ["a bag"] * 2, [4, 5, 4, 5]
    with torch.no_grad():
        images = generate(teacher, prompts, Sampler.DDIM, 3, 3.0, seeds, negative_prompt="long sleeves")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000-seed4.png", "001-seed5.png", "002-seed4.png", "003-seed5.png", "grid.png"]
    for i, name in enumerate(names[:4]):
        with Image.open(out / name) as img:
            assert img.size == (64, 64) and img.mode == "L"  # the model's 32 x 32, times --scale, no frame
            text = dict(img.text)
            pixels = np.asarray(img)
        expected = to_uint8(images[i : i + 1])[0, ..., 0].repeat(2, 0).repeat(2, 1)
        np.testing.assert_array_equal(pixels, expected)
        assert text["prompt"] == prompts[i] and text["seed"] == str(seeds[i]) and text["steps"] == "3"
        assert text["negative_prompt"] == "long sleeves" and text["sampler"] == "ddim" and text["w"] == "3.0"
        assert text["model"] == str(default_model_path()) and "gamma" not in text and "strength" not in text
    grid = labelled_grid(images, ["a photo of a shirt", "a bag"], ["seed 4", "seed 5"], scale=2)
    np.testing.assert_array_equal(_png(out / "grid.png"), np.asarray(grid))

    one = tmp_path / "one.png"
    assert (
        main(
            [
                "sample",
                "--model",
                str(default_model_path()),
                "--prompt",
                "a bag",
                "--num-images",
                "1",
                "--steps",
                "2",
                "--out",
                str(one),
            ]
        )
        == 0
    )
    assert "1 image (ddim, 2 steps, w=3) written to" in capsys.readouterr().out
    assert _png(one).shape == (32, 32)


def test_sample_img2img_size_and_refusals(tmp_path, capsys, teacher, lcm_folder):
    image = _image_file(tmp_path / "in.png")
    out = tmp_path / "i2i.png"
    args = [
        "sample",
        "--model",
        str(default_model_path()),
        "--prompt",
        "a bag",
        "--num-images",
        "1",
        "--steps",
        "4",
        "--sampler",
        "dpmpp",
    ]
    args += ["--image", str(image), "--strength", "0.5", "--height", "32", "--width", "48", "--out", str(out)]
    assert main(args) == 0
    assert "1 image (dpmpp, 4 steps, w=3, img2img strength 0.5)" in capsys.readouterr().out
    init = load_image(image, 1, (32, 48))
    with torch.no_grad():
        want = generate(teacher, ["a bag"], Sampler.DPM_SOLVER_PP_2M, 4, 3.0, [0], init_images=init, strength=0.5)
    assert want.shape == (1, 1, 32, 48)
    np.testing.assert_array_equal(_png(out), to_uint8(want)[0, ..., 0])
    with Image.open(out) as img:
        assert img.text["strength"] == "0.5" and img.text["image"] == str(image) and img.text["width"] == "48"

    base = [
        "sample",
        "--model",
        str(default_model_path()),
        "--prompt",
        "a bag",
        "--num-images",
        "1",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "r.png"),
    ]
    refusals = [
        (["--sampler", "tcd"], "the tcd sampler needs an LCM"),
        (["--negative-guidance", "1"], "--negative-guidance is for LCMs"),
        (["--guidance", "0", "--negative-prompt", "a coat"], "--negative-prompt needs --guidance w > 0"),
        (["--model", str(lcm_folder), "--negative-prompt", "a coat"], "add --negative-guidance"),
        (["--model", str(lcm_folder), "--sampler", "ddim", "--image", str(image), "--strength", "0.2"], "runs int"),
    ]
    for extra, message in refusals:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)


def test_sample_tcd_and_negative_guidance_with_an_lcm(tmp_path, capsys, lcm_folder, lcm_model):
    out = tmp_path / "tcd.png"
    args = ["sample", "--model", str(lcm_folder), "--prompt", "a photo of a shirt", "--num-images", "1"]
    args += ["--sampler", "tcd", "--gamma", "0.5", "--negative-prompt", "long sleeves", "--negative-guidance", "1.5"]
    assert main([*args, "--seed", "9", "--out", str(out)]) == 0
    assert "1 image (tcd, 4 steps, w=3, gamma=0.5, negative guidance 1.5)" in capsys.readouterr().out
    with torch.no_grad():
        want = generate(
            lcm_model,
            ["a photo of a shirt"],
            Sampler.TCD,
            4,
            lcm_model.default_w,
            [9],
            negative_prompt="long sleeves",
            gamma=0.5,
            negative_guidance=1.5,
        )
    np.testing.assert_array_equal(_png(out), to_uint8(want)[0, ..., 0])
    with Image.open(out) as img:
        assert img.text["gamma"] == "0.5" and img.text["negative_guidance"] == "1.5" and img.text["sampler"] == "tcd"


# --- grids -----------------------------------------------------------------------------------------------------------
def test_labelled_grid_places_images_and_labels():
    values = torch.linspace(-0.8, 0.8, 6)
    images = values.reshape(6, 1, 1, 1).expand(6, 1, 8, 8).clone()
    rows, columns = ["row one", ""], ["a", "b", "a long column label that wraps"]
    sheet = np.asarray(labelled_grid(images, rows, columns, scale=2, pad=2))
    expected = to_uint8(images)[..., 0]
    found = []
    for value in expected[:, 0, 0]:  # the top-left corner of the 16 x 16 block of each shade (text is anti-aliased)
        corners = [
            (y, x)
            for y, x in zip(*np.nonzero(sheet == value), strict=True)
            if (sheet[y : y + 16, x : x + 16] == value).all() and sheet[y : y + 16, x : x + 16].shape == (16, 16)
        ]
        assert corners, value
        found.append(corners[0])
    tops, lefts = sorted({y for y, _ in found}), sorted({x for _, x in found})
    assert len(tops) == 2 and len(lefts) == 3 and tops[1] - tops[0] >= 18 and lefts[1] - lefts[0] == 18
    assert found == [(tops[r], lefts[k]) for r in range(2) for k in range(3)]  # row-major
    ink = sheet < 128
    header, label_column = ink[: tops[0]], ink[:, : lefts[0]]
    for k in range(3):
        assert header[:, lefts[k] : lefts[k] + 16].any(), k  # every column label is drawn above its column
    assert label_column[tops[0] : tops[0] + 16].any()  # "row one"
    assert not label_column[tops[1] :].any()  # the empty label draws nothing
    assert (sheet[~ink] >= 128).all() and sheet.shape[1] > lefts[2] + 16
    with pytest.raises(ValueError, match="do not fill"):
        labelled_grid(images, rows, columns[:2])


def test_save_image_exact_size_and_unicode_metadata(tmp_path):
    image = torch.rand(3, 5, 7) * 2 - 1
    path = save_image(image, tmp_path / "x.png", scale=3, metadata={"prompt": "café ☕", "seed": 3, "lora": None})
    with Image.open(path) as img:
        assert img.size == (21, 15) and img.mode == "RGB"
        assert img.text == {"prompt": "café ☕", "seed": "3"}
        np.testing.assert_array_equal(np.asarray(img)[::3, ::3], to_uint8(image[None])[0])


def test_demo_grid_is_labelled(tmp_path, monkeypatch):
    """``lcm demo``'s demo_grid.png: rows "teacher DDIM 1 step" … "LCM 8 steps", columns the class prompts."""
    import lcm.demo as demo

    made = []

    def fake_generate(model, prompts, sampler, steps, w, seeds, **kwargs):
        made.append(torch.full((len(prompts), 1, 32, 32), -0.9 + 0.2 * len(made)))
        return made[-1]

    def fake_row(model, row, prompts, evaluator):
        metrics = {"fd_clf": 1.0, "kid_clf": 0.0, "prompt_accuracy": 0.5, "seconds_per_image": 0.0, "n_samples": 1}
        return row_record(row, "model", metrics, fingerprint="-")

    monkeypatch.setattr(demo, "run_training", lambda *a, **k: {"steps": 1, "wall_seconds": 0.0})
    monkeypatch.setattr(demo.LatentDiffusion, "from_pretrained", lambda *a, **k: SimpleNamespace(is_flow=False))
    monkeypatch.setattr(demo, "FashionEvaluator", lambda *a, **k: None)
    monkeypatch.setattr(demo, "fashion_eval_prompts", lambda *a, **k: [])
    monkeypatch.setattr(demo, "evaluate_row", fake_row)
    monkeypatch.setattr(demo, "generate", fake_generate)
    demo.run_demo(demo.DemoConfig(out=tmp_path / "demo"))
    rows = [f"{m} {s} step{'' if s == 1 else 's'}" for m in ("teacher DDIM", "LCM") for s in (1, 2, 4, 8)]
    assert rows[0] == "teacher DDIM 1 step" and rows[-1] == "LCM 8 steps"
    expected = labelled_grid(torch.cat(made), rows, class_prompts(), scale=2)
    np.testing.assert_array_equal(_png(tmp_path / "demo" / "demo_grid.png"), np.asarray(expected))


def test_validation_grid_shows_what_the_export_samples(tmp_path, teacher):
    """``ConsistencyTask.validate``: rows "LCM n steps", columns "prompt, seed s", the images those ``lcm sample``
    draws from the exported LCM (loaded from disk, not the task's in-memory networks); the grid also as NHWC."""
    from lcm.config import LCDConfig, ValidationConfig
    from lcm.training.task import DistillTask

    validation = ValidationConfig(prompts=("a bag", "a coat"), w=3.0)
    task = DistillTask(teacher, LCDConfig(num_solver_steps=10, w_min=1, w_max=5), validation=validation)
    with torch.no_grad():  # a w projection that is not zero, so that w matters
        task.method.target.time_embedding.cond_proj.weight.normal_(0, 0.01)
    result = task.validate(7, tmp_path)
    assert result.metrics == {}
    task.export(tmp_path / "lcm")
    exported = LatentDiffusion.from_pretrained(tmp_path / "lcm")
    prompts, seeds = ["a bag", "a bag", "a coat", "a coat"], [0, 1, 0, 1]
    rows = [generate(exported, prompts, Sampler.LCM, n, 3.0, seeds) for n in (1, 2, 4, 8)]
    labels = ["LCM 1 step", "LCM 2 steps", "LCM 4 steps", "LCM 8 steps"]
    columns = ["a bag, seed 0", "a bag, seed 1", "a coat, seed 0", "a coat, seed 1"]
    expected = np.asarray(labelled_grid(torch.cat(rows), labels, columns, scale=2))
    np.testing.assert_array_equal(_png(tmp_path / "step-000007.png"), expected)
    tensorboard = result.images["validation"]
    assert tensorboard.shape == (1, *expected.shape, 3) and tensorboard.dtype == np.uint8
    np.testing.assert_array_equal(tensorboard[0, ..., 0], expected)


# --- lcm serve -------------------------------------------------------------------------------------------------------
def _client(model):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")

    from lcm.serve import Engine, create_app
    from serve_client import local_client

    return local_client(create_app(Engine(model)))


def _pixels(data_url: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(data_url.partition(",")[2]))) as img:
        return np.asarray(img)


def test_serve_tcd_negative_guidance_and_img2img(lcm_model, teacher):
    prompt, negative = "a photo of a shirt", "long sleeves"
    request = {"prompt": prompt, "negative_prompt": negative, "steps": 3, "w": 2.0, "seed": 4, "batch": 2}
    with _client(lcm_model) as client:
        info = client.get("/api/health").json()
        assert info["samplers"] == ["lcm", "tcd"] and info["defaults"]["gamma"] == 0.3
        body = client.post("/api/generate", json={**request, "sampler": "tcd", "gamma": 0.7, "negative_guidance": 2})
        assert body.status_code == 200, body.text
        body = body.json()
        assert body["sampler"] == "tcd" and body["gamma"] == 0.7 and body["negative_guidance"] == 2
        r = client.post("/api/generate", json={**request, "sampler": "ddim"})
        assert r.status_code == 400 and "sampler ddim is not available" in r.json()["error"]
        r = client.post("/api/generate", json={**request, "gamma": 2})
        assert r.status_code == 400 and "gamma must be between 0 and 1" in r.json()["error"]
    with torch.no_grad():
        cond = lcm_model.encode_prompts([prompt] * 2)
        uncond = lcm_model.encode_prompts([negative] * 2)
        latents = sample_latents(lcm_model, cond, uncond, Sampler.TCD, 3, 2.0, [4, 5], gamma=0.7, negative_guidance=2)
        want = to_uint8(lcm_model.decode(latents))[..., 0]
    for got, expected in zip(body["images"], want, strict=True):
        np.testing.assert_array_equal(_pixels(got), expected)

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)).save(buf, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with _client(teacher) as client:
        r = client.post("/api/generate", json={**request, "sampler": "tcd"})
        assert r.status_code == 400 and "sampler tcd is not available" in r.json()["error"]
        r = client.post("/api/generate", json={**request, "negative_guidance": 1})
        assert r.status_code == 400 and "negative_guidance is for LCMs" in r.json()["error"]
        r = client.post("/api/generate", json={**request, "image": image, "strength": 0.1})
        assert r.status_code == 400 and "runs int(3·0.1) = 0 steps" in r.json()["error"]
        body = client.post("/api/generate", json={**request, "image": image, "strength": 0.7}).json()
    assert body["img2img"] is True
    init = torch.from_numpy(_pixels(image).astype(np.float32) / 127.5 - 1)[None, None].expand(2, 1, 32, 32)
    with torch.no_grad():
        cond, uncond = teacher.encode_prompts([prompt] * 2), teacher.encode_prompts([negative] * 2)
        latents = img2img_latents(teacher, init, 0.7, cond, uncond, Sampler.DDIM, 3, 2.0, [4, 5], "trailing")
        want = to_uint8(teacher.decode(latents))[..., 0]
    for got, expected in zip(body["images"], want, strict=True):
        np.testing.assert_array_equal(_pixels(got), expected)
