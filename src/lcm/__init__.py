"""Latent Consistency Models (Luo et al. 2023, arXiv 2310.04378) and LCM-LoRA (arXiv 2311.05556).

The maths lives in small pure modules that read like the paper:

- :mod:`lcm.maths.schedule`        noise schedule α_t, σ_t, λ_t read from a diffusers scheduler config
- :mod:`lcm.maths.parameterization` ε / v / x0 prediction conversions
- :mod:`lcm.maths.guidance`        classifier-free guidance (LCM convention) and the w-embedding
- :mod:`lcm.maths.consistency`     c_skip / c_out and the consistency function
- :mod:`lcm.maths.timesteps`       skipping-step grid, training pairs and the samplers' timestep lists
- :mod:`lcm.maths.solvers`         ODE solvers Ψ (DDIM, DPM-Solver-2, DPM-Solver++(2S)) over a denoiser callable
- :mod:`lcm.maths.sampling`        multistep consistency sampling and the teacher's DDIM / DPM-Solver baselines
- :mod:`lcm.maths.losses`          per-sample L2 and pseudo-Huber distances
"""

__version__ = "0.1.0"
