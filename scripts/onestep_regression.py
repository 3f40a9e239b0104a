"""How far the embedded LCM's 1-step sample gets by regression alone: its consistency output from pure noise
regressed onto the teacher's best sample from the same noise (Luhman & Luhman 2021's knowledge distillation, DMD's
regression term), with the loss on held-out pairs beside the training loss, then evaluated like the table's rows.

    python scripts/onestep_regression.py --out runs/regress [--pairs 8000] [--steps 4000] [--lr 1e-4]

1. Pairs (OUT/pairs.pt, made once): noise z of seed 7,000,000 + i (no evaluation seed's) and the teacher's
   DPM-Solver 25-step sample from it (its best row, docs/eval/table.md) under a random caption of class i mod 10, at
   w cycled over 1, 1.5, …, 5 by batch. The last tenth is held out.
2. Training (OUT/model): the student starts as ``--init`` (the shipped LCM); each step draws ``--batch`` training
   pairs and takes an AdamW step on mean((f(z, w, c, T − 1) − x̂0_teacher)²) in latent space, the LCM's 1-step sample
   against its pair; every ``--every`` steps the same loss over all held-out pairs is logged (OUT/history.json).
3. Evaluation (OUT/results.json): the LCM sampler at 1, 2, 4 and 8 steps, w = 3, ``--samples`` images of the
   evaluation seed 0 (the table's prompts and noise), FD-clf and prompt accuracy, like scripts/methods.py's rows.

A probe of the network and the 1-step map, not a training method of the package: only the t = T − 1 input is
trained, so nothing keeps the other steps (they are evaluated to show it).

    python scripts/onestep_regression.py --out runs/regress --pairs 12000 --beside-consistency 1 --steps 3000

``--beside-consistency λ`` makes the regression a term beside the consistency loss instead: a second stage of
``--steps`` steps on the shipped LCM with its own settings (scripts/methods.py's ``shipped>lcm`` control,
lengthened; the recipe's rate), whose per-sample loss gains λ·mean((f(z, w, c, T − 1) − x̂0)²) over as many training
pairs as the batch, drawn from their own generator (seed 1000 + ``--seed``). The run and its rows are in
OUT/shipped>lcm-regλ-STEPS-sSEED, evaluated like scripts/methods.py's. The loop's loss is wrapped here for the probe;
the package has no such term.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from lcm.evaluation.metrics import FashionEvaluator
from lcm.evaluation.plan import EvalSettings
from lcm.evaluation.prompts import eval_seeds, fashion_eval_prompts
from lcm.evaluation.run import Row, evaluate_rows
from lcm.maths.sampling import randn_per_image
from lcm.maths.timesteps import Sampler, sampler_timesteps
from lcm.models.latent_diffusion import LatentDiffusion
from lcm.sample import sample_latents
from lcm.shipped import default_model_path, default_sampling_path

PAIR_SEED = 7  # pair i: noise seed 7,000,000 + i, the caption draw of fashion_eval_prompts(n, 7)
W_GRID = [1.0 + 0.5 * k for k in range(9)]  # 1, 1.5, ..., 5, one per batch of pairs
TEACHER_SAMPLER, TEACHER_STEPS = Sampler.DPM_SOLVER_2M, 25
STEPS = (1, 2, 4, 8)


@torch.no_grad()
def make_pairs(path: Path, n: int, batch: int = 250) -> dict:
    """``n`` pairs, made once into ``path``; a file of fewer, made in whole batches, is extended (pair i does not
    depend on ``n``)."""
    old = torch.load(path, weights_only=True) if path.is_file() else None
    done = len(old["prompts"]) if old else 0
    if done >= n:
        return {key: value[:n] for key, value in old.items()}
    if done % batch:
        raise SystemExit(f"{path} holds {done} pairs, not whole batches of {batch}: move it away")
    teacher = LatentDiffusion.from_pretrained(default_model_path())
    prompts, seeds = fashion_eval_prompts(n, PAIR_SEED).prompts, eval_seeds(n, PAIR_SEED)
    if old and old["prompts"] != prompts[:done]:
        raise SystemExit(f"{path} was made from other captions: move it away")
    zs, xs, ws = ([old["z"]], [old["x0"]], old["w"].tolist()) if old else ([], [], [])
    start = time.perf_counter()
    for i in range(done, n, batch):
        p, s, w = prompts[i : i + batch], seeds[i : i + batch], W_GRID[(i // batch) % len(W_GRID)]
        cond, uncond = teacher.encode_prompts(p), teacher.encode_prompts([""] * len(p))
        xs.append(sample_latents(teacher, cond, uncond, TEACHER_SAMPLER, TEACHER_STEPS, w, s).float().cpu())
        gens = [torch.Generator().manual_seed(int(x)) for x in s]  # the same first draw sample_latents makes
        zs.append(randn_per_image((len(p), *teacher.latent_shape), gens))
        ws += [w] * len(p)
        print(f"pairs {i + len(p)}/{n} ({time.perf_counter() - start:.0f} s)", flush=True)
    pairs = {"z": torch.cat(zs), "x0": torch.cat(xs), "w": torch.tensor(ws), "prompts": prompts}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(pairs, path)
    return pairs


def one_step(model: LatentDiffusion, z: torch.Tensor, prompts: list[str], w: torch.Tensor) -> torch.Tensor:
    t = sampler_timesteps(Sampler.LCM, 1, model.scheduler_config, model.schedule).expand(z.shape[0])
    return model.consistency_output(z, t, model.encode_prompts(prompts, cache=True), model.w_input(w))


@torch.no_grad()
def held_out_loss(model: LatentDiffusion, pairs: dict, idx: torch.Tensor, batch: int = 500) -> float:
    total = 0.0
    for i in range(0, len(idx), batch):
        j = idx[i : i + batch]
        pred = one_step(model, pairs["z"][j], [pairs["prompts"][k] for k in j], pairs["w"][j])
        total += (pred.float() - pairs["x0"][j]).pow(2).mean(dim=(1, 2, 3)).sum().item()
    return total / len(idx)


def train(a: argparse.Namespace, pairs: dict, folder: Path) -> None:
    """The regressed model in ``folder``, which appears only when training is done (a rerun starts afresh)."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(a.init, partial, ignore=shutil.ignore_patterns("train", "results*.json"))
    model = LatentDiffusion.from_pretrained(a.init)
    unet = model.unet.float().train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=a.lr, weight_decay=0.0)
    n = len(pairs["prompts"])
    held = torch.arange(n - n // 10, n)
    gen = torch.Generator().manual_seed(a.seed)
    history = [{"step": 0, "held_out": held_out_loss(model, pairs, held)}]
    print(history[-1], flush=True)
    running, start = [], time.perf_counter()
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, n - n // 10, (a.batch,), generator=gen)
        pred = one_step(model, pairs["z"][idx], [pairs["prompts"][k] for k in idx], pairs["w"][idx])
        loss = (pred - pairs["x0"][idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append(loss.item())
        if step % a.every == 0 or step == a.steps:
            record = {"step": step, "train": sum(running) / len(running), "held_out": held_out_loss(model, pairs, held)}
            record["seconds"] = round(time.perf_counter() - start, 1)
            history.append(record)
            running = []
            print(record, flush=True)
    unet.eval().save_pretrained(partial / "unet")
    partial.rename(folder)
    about = {"init": str(a.init), "lr": a.lr, "steps": a.steps, "batch": a.batch, "seed": a.seed, "pairs": n}
    (folder.parent / "history.json").write_text(json.dumps({"settings": about, "history": history}, indent=2) + "\n")


def beside_consistency(a: argparse.Namespace, pairs: dict) -> None:
    import methods  # scripts/methods.py: the second stage's settings and its evaluated rows

    from lcm.training.lcd import LCD

    name = f"shipped>lcm-reg{a.beside_consistency:g}-{a.steps}"
    methods.SECOND[name] = (methods.SHIPPED, {"loop.max_steps": a.steps})
    methods.METHODS[name] = methods.SECOND[name][1]
    n = len(pairs["prompts"]) - len(pairs["prompts"]) // 10
    draws = torch.Generator().manual_seed(1000 + a.seed)
    consistency = LCD.loss

    def with_regression(self, z0, cond, uncond, generator):
        out = consistency(self, z0, cond, uncond, generator)
        idx = torch.randint(0, n, (z0.shape[0],), generator=draws)
        text = self.model.encode_prompts([pairs["prompts"][i] for i in idx], cache=True)
        t = torch.full((len(idx),), 999.0)
        x = self.student_model.consistency_output(pairs["z"][idx], t, text, self.w_emb(pairs["w"][idx], z0.device))
        regression = (x.float() - pairs["x0"][idx]).pow(2).mean(dim=(1, 2, 3))
        first = out.loss if out.consistency is None else out.consistency
        return out._replace(loss=out.loss + a.beside_consistency * regression.to(out.loss.dtype), consistency=first)

    LCD.loss = with_regression
    evaluator = FashionEvaluator(default_model_path() / "classifier")
    methods.run(a.out, "demo-1500", name, a.seed, a.samples, fashion_eval_prompts(a.samples, 0), evaluator, 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for pairs.pt, model/, history.json, results.json")
    p.add_argument("--init", type=Path, default=default_sampling_path(), help="the LCM to start from (the shipped)")
    p.add_argument("--pairs", type=int, default=8000, help="noise-sample pairs, the last tenth held out")
    p.add_argument("--steps", type=int, default=4000, help="training steps")
    p.add_argument("--batch", type=int, default=32, help="pairs per step")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW's rate (constant)")
    p.add_argument("--every", type=int, default=250, help="steps between held-out losses")
    p.add_argument("--seed", type=int, default=0, help="the pair draws' seed")
    p.add_argument("--samples", type=int, default=2000, help="images per evaluated row")
    p.add_argument(
        "--beside-consistency",
        type=float,
        metavar="λ",
        help="the regression at weight λ beside the shipped LCM's consistency loss, a --steps-step second stage",
    )
    a = p.parse_args()
    pairs = make_pairs(a.out / "pairs.pt", a.pairs)
    if a.beside_consistency is not None:
        return beside_consistency(a, pairs)
    folder = a.out / "model"
    if not (folder / "unet").is_dir():
        train(a, pairs, folder)
    model = LatentDiffusion.from_pretrained(folder)
    rows = [Row("LCM 1-step regression", Sampler.LCM, s, 3.0) for s in STEPS]
    evaluator = FashionEvaluator(default_model_path() / "classifier")
    settings = EvalSettings(num_samples=a.samples, seed=0)
    evaluate_rows(model, rows, fashion_eval_prompts(a.samples, 0), evaluator, a.out / "results.json", settings)


if __name__ == "__main__":
    main()
