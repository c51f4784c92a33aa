"""Solver study: how far PCG must go on the LQF quadratic, and what stopping early does.

    python -m bench.solver            # -> docs/results/solver.{json,md}

On the 100-shot Fashion-MNIST training set (seed 0) it holds out the same 20 %
validation split as `train_model`, builds the LQF quadratic on the other 80 % for each
weight decay lambda, and runs K-FAC-preconditioned CG for up to `--iters` iterations,
recording the relative gradient norm and the *validation* accuracy along the path.
It answers two questions behind the solver defaults: does the optimum (a converged
solve) predict as well as a truncated one, and how many iterations does converging
take. A converged solve matters beyond accuracy: exact unlearning promises "what a fresh
job would give", which is only well defined at the optimum. The test set is not used.

    python -m bench.solver --objectives default isotropic --out docs/results/solver-default.json

studies a job's own quadratic instead (the backbone's default suffix, the input size the
job would choose, products from the layer signals): the default objective, the
K-FAC-metric ridge, against the isotropic ridge whose early stop was the default before.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench.fashion_mnist import few_shot_indices, input_size, load_split, to_tensor
from bench.transfer import machine_info
from lqf_core.backbones import load_backbone
from lqf_core.config import DEFAULT_VAL_FRACTION, Regularizer, TrainConfig
from lqf_core.linearize import batches
from lqf_core.lqf import build_lqf_problem, regularize, solve_quadratic
from lqf_core.train import split_by_item

# The quadratic this study was recorded on (docs/results/solver.*): 2 linearized blocks, the
# default of the time (mobilenet_v2's default is now 4).
SUFFIX_BLOCKS = 2
CHECKPOINTS = (0, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 400)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --objectives: a job's quadratic (default suffix and input size, signal products) with the
# default regularizer, or with the isotropic one at the early stop's weight decay.
OBJECTIVES = {"default": TrainConfig(),
              "isotropic": TrainConfig(regularizer=Regularizer.ISOTROPIC)}


def study(config: TrainConfig, z_fit: torch.Tensor, y_fit: torch.Tensor,
          z_val: torch.Tensor, y_val: torch.Tensor, iters: int, backbone, job: bool) -> dict:
    """The path of one solve of `config`'s quadratic; `job`: with a job's signal products
    (--objectives), else as the session-3 study built it."""
    config = config.replace(weight_decay=config.ridge).resolved_solver_settings()
    lam, probe_l2 = config.ridge, config.probe_l2
    setup = build_lqf_problem(backbone, z_fit, y_fit, 10, config, torch.device("cpu"),
                              signals=job)
    started = time.monotonic()
    precond = regularize(setup.problem, config)
    kfac_s = time.monotonic() - started
    path: list[dict] = []

    def val_accuracy(delta: torch.Tensor) -> float:
        with torch.no_grad():
            logits = torch.cat([setup.lin.forward(z_val[sl], delta)
                                for sl in batches(len(z_val), 256)])
        return float((logits.argmax(1) == y_val).float().mean())

    history: list[float] = []

    def on_iterate(i: int, x: torch.Tensor) -> None:
        if i in CHECKPOINTS:
            path.append({"iteration": i, "val_accuracy": val_accuracy(x),
                         "relative_grad_norm": history[-1]})
            log(f"lambda={lam:g} it={i} rel={history[-1]:.2e} val={path[-1]['val_accuracy']:.3f}")

    path.append({"iteration": 0, "relative_grad_norm": 1.0,
                 "val_accuracy": val_accuracy(torch.zeros(setup.lin.num_params))})
    started = time.monotonic()
    result = solve_quadratic(setup.problem, precond, tol=1e-12, max_iters=iters,
                             callback=lambda i, r: history.append(r), on_iterate=on_iterate)
    solve_s = time.monotonic() - started
    first_below = {f"{t:g}": next((i + 1 for i, r in enumerate(history) if r <= t), None)
                   for t in (1e-2, 1e-3, 1e-4)}
    return {"objective": config.resolved_regularizer.value if job else "isotropic (2 blocks)",
            "metric_strength": (config.metric_strength
                                if config.resolved_regularizer == Regularizer.KFAC else None),
            "weight_decay": lam, "probe_l2": probe_l2, "kfac_seconds": kfac_s,
            "seconds_per_iteration": solve_s / max(result.iterations, 1),
            "iterations_to_tol": first_below, "final_relative_grad_norm": history[-1],
            "path": path}


def markdown(runs: list[dict], command: str, meta: dict) -> str:
    lines = [f"# Solver study\n\n`{command}` — {meta['date']}, {meta['machine']}\n",
             "Validation accuracy (%, the 20 % split of the 100-shot training set) and "
             "relative gradient norm along K-FAC-preconditioned CG.\n",
             "| objective | lambda | probe_l2 | s / iteration | iterations to 1e-2 / 1e-3 / 1e-4 | "
             + " | ".join(f"it {c}" for c in CHECKPOINTS) + " |",
             "|---" * (5 + len(CHECKPOINTS)) + "|"]
    for run in runs:
        by_it = {p["iteration"]: p for p in run["path"]}
        cells = [f"{100 * by_it[c]['val_accuracy']:.1f} ({by_it[c]['relative_grad_norm']:.0e})"
                 if c in by_it else "" for c in CHECKPOINTS]
        tol = " / ".join(str(run["iterations_to_tol"][k]) for k in ("0.01", "0.001", "0.0001"))
        objective = run.get("objective", "isotropic (2 blocks)")
        if run.get("metric_strength"):
            objective += f", mu = {run['metric_strength']:g}"
        lines.append(f"| {objective} | {run['weight_decay']:g} | {run['probe_l2']:g} | "
                     f"{run['seconds_per_iteration']:.2f} | {tol} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.solver", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    parser.add_argument("--probe-l2", type=float, default=TrainConfig.probe_l2)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--objectives", nargs="+", choices=sorted(OBJECTIVES),
                        help="study a job's quadratic with these regularizers instead of "
                             "the session-3 lambda sweep (2 blocks, 64 px)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/solver.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    command = "python -m bench.solver " + " ".join(sys.argv[1:] if argv is None else argv)
    backbone = load_backbone("mobilenet_v2")
    x_pool, y_pool = load_split("train")
    idx = few_shot_indices(y_pool, args.shots, args.seed)
    suffix = backbone.default_suffix_blocks if args.objectives else SUFFIX_BLOCKS
    config = TrainConfig(suffix_blocks=suffix)
    # the session-3 study ran at the fixed 64 px of its time; a job's size comes from the rule
    size = input_size(config, backbone) if args.objectives else 64
    x = to_tensor(x_pool[idx], size, backbone.mean, backbone.std)
    y = torch.as_tensor(y_pool[idx])
    fit, val = split_by_item(y.tolist(), [str(i) for i in idx], DEFAULT_VAL_FRACTION,
                             args.seed)
    prefix = backbone.split(config.suffix_blocks)[0]
    with torch.no_grad():
        z = torch.cat([prefix(x[sl]) for sl in batches(len(x), 128)])
    if args.objectives:
        configs = [OBJECTIVES[name].replace(suffix_blocks=suffix, image_size=size)
                   for name in args.objectives]
    else:  # the session-3 sweep: the isotropic ridge at each lambda
        configs = [TrainConfig(weight_decay=lam, probe_l2=args.probe_l2,
                               suffix_blocks=SUFFIX_BLOCKS, regularizer=Regularizer.ISOTROPIC)
                   for lam in args.lambdas]
    runs = [study(config, z[fit], y[fit], z[val], y[val], args.iters, backbone,
                  job=bool(args.objectives)) for config in configs]
    meta = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_info().get("cpu", "unknown")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, **meta, "runs": runs}, indent=1))
    text = markdown(runs, command.strip(), meta)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
