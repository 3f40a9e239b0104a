"""Named recipes: dotted overrides of the run-config tree (:class:`lcm.config.run.RunConfig`), so that ``lcm demo``,
its variants and the research scripts start from one definition and change only what their names say
(docs/fidelity.md says why each value).

A recipe is applied with :func:`recipe_config`; its evaluation settings (images per row, the w of every row) sit
beside it in :data:`EVALUATION`.
"""

from __future__ import annotations

from typing import Any

from lcm.config.knobs import override
from lcm.config.run import RunConfig
from lcm.maths.timesteps import DEFAULT_NUM_SOLVER_STEPS

__all__ = ["EVALUATION", "FLOW", "RECIPES", "recipe_config"]

# The demo recipe (docs/fidelity.md): k = 100 (N = 10), w ~ U[1, 5], rate 2e-4 with a cosine decay to 10% after 100
# warm-up steps, the zero-initialised w projection at 10x the rate; 750 steps of batch 32, so that lcm demo ends in
# about 10 minutes on the slower 2-core CPUs too (README, docs/fidelity.md §5; 1,500 steps until then: "demo-1500").
DEMO: dict[str, Any] = {
    "data.batch_size": 32,
    "method.num_solver_steps": 10,
    "method.w_min": 1.0,
    "method.w_max": 5.0,
    "method.ema_decay": 0.95,
    "method.w_lr_scale": 10.0,
    "optim.learning_rate": 2e-4,
    "optim.lr_schedule": "cosine_floor",
    "optim.lr_warmup_steps": 100,
    "loop.max_steps": 750,
    "loop.checkpoint_every": 250,
    "loop.log_every": 15,
    "loop.validate_every": 0,
    "loop.compile": "off",
}

# What every recipe changes for a flow-matching teacher (lcm demo --teacher flow): its student, an MMDiT, takes no w
# input, so it is distilled at the one w the demo evaluates; Heun's solver (docs/evaluation.md, "Flow-matching
# teacher": 2,000 images, two seeds each, it beats Euler's at every step count by 12-22 FD-clf).
FLOW: dict[str, Any] = {
    "method.w_min": 3.0,
    "method.w_max": 3.0,
    "method.solver": "heun",
}

RECIPES: dict[str, dict[str, Any]] = {
    "demo": DEMO,
    # twice the demo's steps: the demo until it was halved, and the budget of docs/eval/methods.md
    "demo-1500": {**DEMO, "loop.max_steps": 1500, "loop.checkpoint_every": 500},
    # the demo's settings for 10,000 steps, compiled: 1.3-1.4x the eager steps/s on the CPU, so the hour holds them
    "long": {
        **DEMO,
        "loop.max_steps": 10_000,
        "loop.checkpoint_every": 3333,
        "loop.log_every": 100,
        "loop.compile": "on",
    },  # fmt: skip
    # a minute-long smoke run that exercises every stage; its numbers mean nothing
    "quick": {**DEMO, "loop.max_steps": 20, "loop.checkpoint_every": 6, "loop.log_every": 1},
    # the demo recipe before docs/fidelity.md changed it (k = 20, a constant rate, the w projection at the base
    # rate): the base of scripts/fidelity_ablation.py, scripts/ablation.py and scripts/lcf_demo.py
    "before-fidelity": {
        **DEMO,
        "loop.max_steps": 1500,
        "loop.checkpoint_every": 500,
        "method.num_solver_steps": DEFAULT_NUM_SOLVER_STEPS,
        "method.w_lr_scale": 1.0,
        "optim.lr_schedule": "constant",
        "optim.lr_warmup_steps": 0,
    },  # fmt: skip
}

# Evaluation of a recipe's LCM by lcm demo: images per table row and the guidance w of every row.
EVALUATION: dict[str, dict[str, Any]] = {
    "demo": {"samples": 1000, "w": 3.0},
    "demo-1500": {"samples": 1000, "w": 3.0},
    "long": {"samples": 2000, "w": 3.0},
    "quick": {"samples": 100, "w": 3.0},
    "before-fidelity": {"samples": 2000, "w": 3.0},
}


def recipe_config(name: str, changes: dict[str, Any] | None = None, base: RunConfig | None = None) -> RunConfig:
    """The run-config tree of recipe ``name`` (over ``base``, default the distillation defaults), with dotted
    ``changes`` on top."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return override(base or RunConfig(), {**RECIPES[name], **(changes or {})})
