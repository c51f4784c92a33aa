"""Leave-one-out of the default model in closed form against actually retraining, at scale.

    python -m bench.default_loo      # -> docs/results/default-loo.{json,md}

A default job on 100-shot Fashion-MNIST (1,000 items, MobileNetV2, the input-size rule's
96 px, a fifth held out: 800 training items) is the served model: the K-FAC-metric ridge
solved to its optimum. For `--items` random training items i this script computes the
item's leave-one-out output f_-i(z_i) in closed form (docs/method.md, "Exact queries"):

    Y_i - f_-i(z_i) = (I - L_ii)^-1 e_i,   L_ii = J_i H^-1 J_i^T / N,

- exact: L_ii from C conjugate-gradient solves H x = J_i^T e_c (for the first
  `--exact-items` items: each costs C solves of about a fit's iterations);
- K-FAC: H_-i ~ (1 + mu)(K + lambda I), L_ii = M (I + M)^-1 (what the service answers);
- first order: f_i - L_ii e_i with the exact L_ii (the classical influence function),

and retrains without the item twice:
- with w0 (the ridge head), K and the prior strength N mu fixed (mu' = mu N / (N - 1)):
  the quadratic the closed form describes;
- as a fresh job's fit: head, K-FAC factors and the quadratic rebuilt on the N - 1 items
  (the split is by item id, so the other items keep their sides).

The error is max_c |closed form - retrained| / max_c |retrained|, the issue's "relative
error of the output". Timings depend on the machine's load; the errors do not.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.fashion_mnist import few_shot_indices, load_split, to_tensor
from bench.transfer import machine_info
from lqf_core.backbones import load_backbone
from lqf_core.config import TrainConfig
from lqf_core.lqf import (
    CurvatureApproximation,
    LQFFit,
    build_lqf_problem,
    fit_lqf,
    regularize,
    solve_quadratic,
)
from lqf_core.solve import conjugate_gradient
from lqf_core.train import train_model

CLASS_NAMES = [str(c) for c in range(10)]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def relative_error(closed: torch.Tensor, retrained: torch.Tensor) -> float:
    return float((closed - retrained).abs().max()) / float(retrained.abs().max())


class ClosedForms:
    """The leave-one-out outputs of one fit's training items in closed form."""

    def __init__(self, fit: LQFFit, curvature: CurvatureApproximation, tol: float):
        self.fit, self.curvature, self.tol = fit, curvature, tol
        problem = fit.setup.problem
        self.n = problem.n
        self.outputs = problem.outputs(fit.delta).double()
        self.residuals = problem.targets.double() - self.outputs  # e = Y - f

    def gradients(self, i: int) -> list[torch.Tensor]:
        """J_i^T e_c for every output c: the item's Jacobian rows."""
        problem = self.fit.setup.problem
        rows = []
        for c in range(problem.targets.shape[1]):
            u = torch.zeros_like(problem.targets)
            u[i, c] = 1
            rows.append(problem.transpose_products(u))
        return rows

    def exact_leverage(self, i: int, rows: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """L_ii = J_i H^-1 J_i^T / N from C solves."""
        problem = self.fit.setup.problem
        columns, solves = [], []
        for g in rows:
            result = conjugate_gradient(problem.hessian_matvec, g, preconditioner=self.curvature,
                                        tol=self.tol, max_iters=400)
            solves.append({"iterations": result.iterations,
                           "relative_residual": result.relative_residual})
            columns.append(problem.jacobian_products(result.x)[i])
        return torch.stack(columns, 1).double() / self.n, {"solves": solves}

    def kfac_leverage(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """The service's K-FAC leverage: M = J_i ((1 + mu)(K + lambda I))^-1 J_i^T / N,
        L = M (I + M)^-1 (posterior.LQFPosterior.leverages)."""
        m = torch.stack([torch.stack([a.double() @ self.curvature(b).double() for b in rows])
                         for a in rows]) / self.n
        m = 0.5 * (m + m.T)
        eye = torch.eye(len(rows), dtype=m.dtype)
        return torch.linalg.solve(eye + m, m)

    def loo_output(self, i: int, leverage: torch.Tensor) -> torch.Tensor:
        targets = self.fit.setup.problem.targets[i].double()
        eye = torch.eye(len(targets), dtype=leverage.dtype)
        return targets - torch.linalg.solve(eye - leverage, self.residuals[i])

    def first_order_output(self, i: int, leverage: torch.Tensor) -> torch.Tensor:
        return self.outputs[i] - leverage @ self.residuals[i]


def retrain_fixed(full: LQFFit, config: TrainConfig, backbone: Any, z: torch.Tensor,
                  y: torch.Tensor, keep: torch.Tensor, tol: float) -> tuple[torch.Tensor, dict]:
    """The fit without the left-out item with w0, K and N mu fixed, started at the full
    fit's optimum (the reduced optimum is unique) -> (its delta, solver facts)."""
    problem = full.setup.problem
    assert problem.metric is not None
    n = problem.n
    setup = build_lqf_problem(backbone, z[keep], y[keep], len(CLASS_NAMES), config,
                              z.device, head=(full.setup.head_weight, full.setup.head_bias),
                              signals=True)
    reduced = setup.problem
    reduced.metric, reduced.metric_strength = problem.metric, config.metric_strength * n / (n - 1)
    curvature = CurvatureApproximation(problem.metric, 1.0 / (1.0 + config.metric_strength))
    result = solve_quadratic(reduced, curvature, tol, 500, x0=full.delta)
    return result.x, {"iterations": result.iterations,
                      "relative_grad_norm": result.relative_residual}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.default_loo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--items", type=int, default=5)
    parser.add_argument("--exact-items", type=int, default=2,
                        help="of those, how many get the exact closed form (C solves each)")
    parser.add_argument("--tol", type=float, default=1e-5,
                        help="relative residual of the closed form's and the fixed refit's solves")
    parser.add_argument("--out", type=Path, default=Path("docs/results/default-loo.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    backbone = load_backbone("mobilenet_v2")
    x_pool, y_pool = load_split("train")
    idx = few_shot_indices(y_pool, args.shots, args.seed)
    size = 96  # what the input-size rule gives 28 px images (checked below)
    images = to_tensor(x_pool[idx], size, backbone.mean, backbone.std)
    labels = y_pool[idx].tolist()
    cache: dict = {}
    started = time.monotonic()
    model = train_model(images, labels, CLASS_NAMES,
                        TrainConfig(seed=args.seed, device="cpu", image_size=None),
                        backbone=backbone, prefix_cache=cache)
    job_seconds = time.monotonic() - started
    config = model.config
    assert config.image_size == size, config.image_size
    ids = model.info["train_item_ids"]
    z = torch.stack([cache[i] for i in ids])
    y = torch.tensor([labels[int(i)] for i in ids])
    log(f"default job {job_seconds:.1f} s: {len(ids)} training items, "
        f"{model.info['solver_iterations']} iterations, relative gradient norm "
        f"{model.info['relative_grad_norm']:.1e}")
    device = torch.device("cpu")
    # The job's fit again, keeping its quadratic (the job keeps only the model).
    full = fit_lqf(backbone, z, y, len(CLASS_NAMES), config, device)
    problem = full.setup.problem
    # fit_lqf keeps the K it regularized with but not the curvature approximation: the
    # same factors again (from the recorded signals), attached as the same metric.
    curvature = regularize(problem, config)
    job_delta = full.setup.lin.space.flatten(
        {n: model.tensors[f"delta.{n}"].to(full.delta) for n in full.setup.lin.space.names})
    same = float((full.delta - job_delta).abs().max())
    log(f"refit: {full.info['solver_iterations']} iterations, max |delta - job's| {same:.1e}")
    forms = ClosedForms(full, curvature, args.tol)
    chosen = np.random.default_rng(args.seed).choice(len(ids), args.items, replace=False)
    rows = []
    for count, i in enumerate(chosen.tolist()):
        keep = torch.tensor([j for j in range(len(ids)) if j != i])
        row: dict[str, Any] = {"item": ids[i]}
        grads = forms.gradients(i)
        kfac_lev = forms.kfac_leverage(grads)
        fixed_delta, row["fixed_refit"] = retrain_fixed(full, config, backbone, z, y, keep,
                                                        args.tol)
        fixed = full.setup.lin.forward(z[i:i + 1], fixed_delta)[0].double()
        fresh_fit = fit_lqf(backbone, z[keep], y[keep], len(CLASS_NAMES), config, device)
        fresh = fresh_fit.setup.lin.forward(z[i:i + 1], fresh_fit.delta)[0].double()
        row["fresh_refit"] = {"iterations": fresh_fit.info["solver_iterations"],
                              "relative_grad_norm": fresh_fit.info["relative_grad_norm"]}
        answers = {"kfac": forms.loo_output(i, kfac_lev)}
        if count < args.exact_items:
            exact_lev, row["exact_solves"] = forms.exact_leverage(i, grads)
            answers["exact"] = forms.loo_output(i, exact_lev)
            answers["first_order"] = forms.first_order_output(i, exact_lev)
        row["served_output"] = forms.outputs[i].tolist()
        row["retrained_fixed"], row["retrained_fresh"] = fixed.tolist(), fresh.tolist()
        row["errors"] = {name: {"vs_fixed": relative_error(out, fixed),
                                "vs_fresh": relative_error(out, fresh)}
                         for name, out in answers.items()}
        row["fixed_vs_fresh"] = relative_error(fixed, fresh)
        row["served_vs_fresh"] = relative_error(forms.outputs[i], fresh)
        rows.append(row)
        log(f"item {ids[i]}: " + ", ".join(
            f"{k} {v['vs_fixed']:.1e} / {v['vs_fresh']:.1e}" for k, v in row["errors"].items())
            + f"; fixed vs fresh {row['fixed_vs_fresh']:.1e}")
    meta = {"command": "python -m bench.default_loo " + " ".join(argv or []),
            "shots": args.shots, "seed": args.seed, "tol": args.tol,
            "job_seconds": job_seconds, "job_info": {k: v for k, v in model.info.items()
                                                     if not isinstance(v, list)},
            "config": config.to_dict(), "refit_max_delta_difference": same,
            "machine": machine_info(), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "items": rows}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(meta, rows))
    print(render(meta, rows))


def render(meta: dict, rows: list[dict]) -> str:
    def cell(row: dict, name: str, against: str) -> str:
        error = row["errors"].get(name, {}).get(against)
        return "" if error is None else f"{error:.1e}"

    table = ["| item | exact vs w0 fixed | exact vs fresh | first order vs fresh | "
             "K-FAC vs w0 fixed | K-FAC vs fresh | w0-fixed refit vs fresh | "
             "served output vs fresh |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        table.append(f"| {row['item']} | {cell(row, 'exact', 'vs_fixed')} | "
                     f"{cell(row, 'exact', 'vs_fresh')} | {cell(row, 'first_order', 'vs_fresh')} | "
                     f"{cell(row, 'kfac', 'vs_fixed')} | {cell(row, 'kfac', 'vs_fresh')} | "
                     f"{row['fixed_vs_fresh']:.1e} | {row['served_vs_fresh']:.1e} |")
    return (f"# Leave-one-out of the default model at scale\n\n`{meta['command'].strip()}` — "
            f"{meta['date']}, {meta['machine'].get('cpu', '')}\n\n"
            "Max |output difference| / max |retrained output| of the left-out item. "
            "\"w0 fixed\": retrained with the head, K and N mu fixed; \"fresh\": a fresh "
            "job's fit on the other items. The last column is how far the item's output "
            "moves at all.\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
