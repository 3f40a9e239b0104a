"""Package the LCM of an ``lcm demo`` run as the shipped embedded LCM, with a model card written from its results.

    lcm demo --out lcm-demo
    python scripts/package_lcm.py lcm-demo src/lcm/assets/fashion-lcm

Copies the exported diffusers folder (``OUT/lcm`` without its training state ``train/``) and writes ``README.md``:
how it was made, the recipe (from ``results.json``), its rows of the demo table and the SHA-256 of every file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from lcm.evaluation.report import markdown_table
from lcm.evaluation.results import Record, load_results

KEEP = ("unet", "vae", "scheduler", "text_encoder")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _settings(results: Path) -> tuple[dict, float, list[Record]]:
    """The settings a card names (a demo's run-config tree, flattened), its training seconds and its rows, from the
    demo's results.json."""
    records = load_results(results)[1]
    about = json.loads(results.read_text())
    config, run = about["config"], about["config"]["run"]
    flat = {**run["method"], **run["optim"], **run["loop"], "batch_size": run["data"]["batch_size"]}
    flat |= {k: config[k] for k in ("recipe", "eval_samples", "w_eval")}
    return flat, about["train_wall_seconds"], records


def card(results: Path, files: list[Path], dest: Path, command: str | None = None) -> str:
    cfg, wall_seconds, records = _settings(results)
    n = int(cfg["num_solver_steps"])
    recipe = cfg.get("recipe", "demo")
    command = command or ("lcm demo" + ("" if recipe == "demo" else f" --recipe {recipe}") + " --out lcm-demo")
    rows = [r for r in records if r.method != "LCM"] + [r for r in records if r.method == "LCM"]
    table = markdown_table(
        ["sampler", "steps", "FD-clf ↓", "KID-clf ↓", "prompt accuracy ↑"],
        [[r.method, r.steps, *(f"{r.metrics[k]:{f}}" for k, f in (("fd_clf", ".1f"), ("kid_clf", ".4f"),
                                                                   ("prompt_accuracy", ".3f")))]
         for r in rows],
    ).splitlines()  # fmt: skip
    reproduces = (
        "The run is deterministic: the same command on the same code reproduces these weights and this table."
        if cfg.get("compile", "off") == "off"
        else "The networks were compiled (torch.compile), whose kernels depend on the CPU and the thread count: "
        "the same command on another machine gives weights and a table that differ in their last digits."
    )
    listing = "\n".join(
        f"| `{f.relative_to(dest)}` | {f.stat().st_size:,} | `{sha256(f)[:16]}…` |" for f in files if f.is_file()
    )
    return f"""# fashion-lcm: the shipped embedded LCM

A full-UNet Latent Consistency Model of the shipped Fashion-MNIST teacher (`../fashion-teacher`), made by Latent
Consistency Distillation on this package's CPU recipe. `lcm sample` and `lcm serve` use it by default; it samples
in 1-8 steps with the guidance weight w as an input (w-embedding), distilled on w ∈ [{cfg["w_min"]}, {cfg["w_max"]}].

## How it was made

```bash
{command}        # code at commit {commit()}
python scripts/package_lcm.py lcm-demo src/lcm/assets/fashion-lcm
```

Recipe (`lcm demo`'s, recipe "{cfg.get("recipe", "demo")}"; docs/fidelity.md): {cfg["max_steps"]} LCD steps of batch
{cfg["batch_size"]}, learning rate {cfg["learning_rate"]} ({cfg.get("lr_schedule", "constant")}), {cfg["solver"]} solver
on the skipping grid N = {n} (k = {1000 // n}), w ~ U[{cfg["w_min"]}, {cfg["w_max"]}], w projection at
{cfg.get("w_lr_scale", 1.0)}× the learning rate, Huber loss (c = 0.001), EMA target μ = {cfg["ema_decay"]}, seed
{cfg["seed"]}, on the 60,000 Fashion-MNIST training images with the
teacher's class captions; {wall_seconds:.0f} s of distillation on a 2-core CPU (wall time, which
depends on what else runs on the cores). {reproduces}

## Evaluation

`lcm demo`'s table: {cfg["eval_samples"]} images per row, w = {cfg["w_eval"]}, the same prompts and seeds in every
row. FD-clf / KID-clf are Fréchet / kernel distances in the features of the teacher's shipped classifier against the
10,000 test images (not FID); prompt accuracy is how often that classifier names the prompted class.

{chr(10).join(table)}

## Files

| file | bytes | SHA-256 |
| --- | ---: | --- |
{listing}

Limitations: 32×32 greyscale Fashion-MNIST images of the ten classes only; 1 step is far below 4 steps, as the
table shows; its guidance input was distilled on w ∈ [{cfg["w_min"]}, {cfg["w_max"]}] and is untested outside it.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("demo_out", help="the --out folder of lcm demo (holds lcm/ and results.json)")
    p.add_argument("dest", help="where the packaged LCM goes (e.g. src/lcm/assets/fashion-lcm)")
    p.add_argument(
        "--command",
        help="the command that made demo_out, as the card should show it (default: lcm demo "
        "with the recipe recorded in results.json)",
    )
    args = p.parse_args(argv)
    src, dest = Path(args.demo_out) / "lcm", Path(args.dest)
    results_file = Path(args.demo_out) / "results.json"
    if not (src / "unet").is_dir() or not results_file.is_file():
        print(
            f"package_lcm: {args.demo_out} is not a finished lcm demo folder (lcm/unet, results.json)", file=sys.stderr
        )
        return 2
    if _settings(results_file)[0]["max_steps"] < 100:
        print("package_lcm: refusing a --quick demo (its numbers mean nothing)", file=sys.stderr)
        return 2
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in KEEP:
        if (src / name).is_dir():
            shutil.copytree(src / name, dest / name)
    for f in src.iterdir():
        if f.is_file() and f.suffix == ".json" and f.name != "demo_config.json":
            shutil.copy2(f, dest / f.name)
    record = dest / "lcm_distill.json"
    if record.is_file():  # name the shipped teacher, not the path it had on the machine that made this
        meta = json.loads(record.read_text())
        if str(meta.get("teacher", "")).endswith("assets/fashion-teacher"):
            meta["teacher"] = "the shipped teacher (lcm/assets/fashion-teacher)"
        record.write_text(json.dumps(meta, indent=2) + "\n")
    files = sorted(f for f in dest.rglob("*") if f.is_file())
    (dest / "README.md").write_text(card(results_file, files, dest, args.command))
    total = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"packaged {src} into {dest} ({total / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
