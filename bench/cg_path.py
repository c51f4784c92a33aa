"""The exact (CG) query path on a default model: does one posterior solve converge?

    python -m bench.cg_path                  # -> docs/results/cg-path.{json,md}
    python -m bench.cg_path --max-iters 50   # shorter

A default `lqf` job (mobilenet_v2, its defaults) on 150 of scikit-learn's digits (15 per
class, 8x8 scaled to 32 px, as a user's small greyscale set), then the posterior the
service builds for CG queries (float64) and one solve of H x = J_* e_c, the unit of an
exact uncertainty or influence query (an image needs C of them), K-FAC-preconditioned
to the service's tolerance 1e-5. It records the time of each phase and the relative
residual along the way.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from PIL import Image

from bench.transfer import machine_info
from lqf_core.backbones import load_backbone
from lqf_core.config import TrainConfig
from lqf_core.posterior import LQFPosterior
from lqf_core.solve import conjugate_gradient
from lqf_core.train import train_model

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
CHECKPOINTS = (1, 10, 25, 50, 100, 200, 300, 400, 500)


def digits(per_class: int) -> tuple[list[Image.Image], list[int]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images, labels = [], []
    for label in range(10):
        for i in [i for i, t in enumerate(data.target) if t == label][:per_class]:
            pixels = (data.images[i] * (255 / 16)).astype("uint8")
            images.append(Image.fromarray(pixels, mode="L").resize((32, 32), Image.NEAREST)
                          .convert("RGB"))
            labels.append(label)
    return images, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cg_path", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-iters", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS / "cg-path.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    backbone = load_backbone("mobilenet_v2")
    images, labels = digits(15)
    config = TrainConfig(device="cpu")
    started = time.monotonic()
    model = train_model(images, labels, [str(c) for c in range(10)], config, backbone=backbone)
    train_s = time.monotonic() - started
    pre = backbone.preprocess(model.config.input_size)
    x = torch.stack([pre(img) for img in images])
    fit = [int(i) for i in model.info["train_item_ids"]]
    prefix = backbone.split(model.config.suffix)[0].eval()
    with torch.no_grad():
        z = prefix(x)
    started = time.monotonic()
    post = LQFPosterior(model, backbone, z[fit], torch.tensor(labels)[fit],
                        dtype=torch.float64)
    build_s = time.monotonic() - started
    started = time.monotonic()
    kfac = post.curvature()
    kfac_s = time.monotonic() - started
    rhs = post._output_gradients(z[:1].double())[0]
    started = time.monotonic()
    result = conjugate_gradient(post.problem.hessian_matvec, rhs, preconditioner=kfac,
                                tol=post.tol, max_iters=args.max_iters)
    solve_s = time.monotonic() - started
    path = {str(i): result.history[i] for i in CHECKPOINTS if i < len(result.history)}
    out = {
        "command": "python -m bench.cg_path --max-iters " + str(args.max_iters),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_info(),
        "training_items": len(fit), "classes": 10, "nc": len(fit) * 10,
        "linearized_params": post.lin.num_params, "train_s": round(train_s, 1),
        "posterior_build_s": round(build_s, 2), "kfac_s": round(kfac_s, 2),
        "solve_s": round(solve_s, 1), "iterations": result.iterations,
        "seconds_per_iteration": round(solve_s / max(result.iterations, 1), 2),
        "tolerance": post.tol, "final_relative_residual": result.relative_residual,
        "converged": result.converged, "residual_along_the_way": path,
    }
    lines = ["| phase | value |", "|---|---|",
             f"| training items x classes | {len(fit)} x 10 = {out['nc']} |",
             f"| linearized weights | {out['linearized_params']:,} |",
             f"| default job's fit | {out['train_s']} s |",
             f"| posterior build (float64) | {out['posterior_build_s']} s |",
             f"| K-FAC factors | {out['kfac_s']} s |",
             f"| one CG solve | {out['iterations']} iterations, {out['solve_s']} s "
             f"({out['seconds_per_iteration']} s each) |",
             f"| relative residual reached | {result.relative_residual:.2e} "
             f"(tolerance {post.tol:g}; converged: {result.converged}) |",
             "| residual after 1 / 10 / 50 / 100 / 200 its | "
             + " / ".join(f"{v:.1e}" for k, v in path.items()
                          if k in ("1", "10", "50", "100", "200")) + " |"]
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(f"# CG query path\n\n`{out['command']}` — "
                                           f"{out['date']}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
