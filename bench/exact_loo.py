"""Exact leave-one-out of the served exact model against actually retraining, at scale.

    python -m bench.exact_loo        # -> docs/results/exact-loo.{json,md}

A model of 100-shot Fashion-MNIST (1,000 items, MobileNetV2, 4 linearized blocks,
solver "exact") gives every item's leave-one-out output in closed form. For `--items`
random training items this script retrains without each, twice:
- with the linearization point w0 (the ridge head) and the prior strength N λ fixed:
  the quantity the closed form describes;
- as a fresh job would: the head refitted on the remaining items.
and reports the relative error: the max over the C outputs of |closed form - retrained|,
divided by the largest |retrained output| of the item.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from bench.fashion_mnist import few_shot_indices, load_split, to_tensor
from bench.transfer import machine_info
from lqf_core.backbones import load_backbone
from lqf_core.config import Solver, TrainConfig
from lqf_core.linearize import batches
from lqf_core.lqf import build_lqf_problem, fit_exact, fit_lqf


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.exact_loo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--items", type=int, default=5, help="items retrained with w0 fixed")
    parser.add_argument("--fresh-items", type=int, default=2,
                        help="of those, how many are also retrained as a fresh job")
    parser.add_argument("--out", type=Path, default=Path("docs/results/exact-loo.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    backbone = load_backbone("mobilenet_v2")
    config = TrainConfig(seed=args.seed, device="cpu", solver=Solver.EXACT, suffix_blocks=4)
    lam = config.ridge
    x_pool, y_pool = load_split("train")
    idx = few_shot_indices(y_pool, args.shots, args.seed)
    x = to_tensor(x_pool[idx], 64, backbone.mean, backbone.std)
    y = torch.from_numpy(y_pool[idx])
    n, device = len(y), torch.device("cpu")
    prefix = backbone.split(4)[0].eval()
    with torch.no_grad():
        z = torch.cat([prefix(x[sl]) for sl in batches(n, 64)])
    started = time.monotonic()
    full = fit_exact(build_lqf_problem(backbone, z, y, 10, config, device))
    full_seconds = time.monotonic() - started
    assert full.loo_outputs is not None
    head = (full.setup.head_weight, full.setup.head_bias)
    log(f"full fit {full_seconds:.1f} s, relative gradient norm "
        f"{full.info['relative_grad_norm']:.1e}")
    chosen = np.random.default_rng(args.seed).choice(n, args.items, replace=False).tolist()
    rows = []
    for count, i in enumerate(chosen):
        keep = torch.tensor([j for j in range(n) if j != i])
        # Prior strength N lambda fixed: lambda' (N - 1) = lambda N.
        fixed = fit_exact(build_lqf_problem(backbone, z[keep], y[keep], 10,
                                            config.replace(weight_decay=lam * n / (n - 1)),
                                            device, head=head))
        out_fixed = fixed.setup.lin.forward(z[i:i + 1], fixed.delta)[0].double()
        closed = full.loo_outputs[i].double()
        scale = float(out_fixed.abs().max())
        row = {"item": i, "closed_form": closed.tolist(), "retrained_w0_fixed": out_fixed.tolist(),
               "relative_error_w0_fixed": float((closed - out_fixed).abs().max()) / scale}
        if count < args.fresh_items:
            fresh = fit_lqf(backbone, z[keep], y[keep], 10, config, device)
            out_fresh = fresh.setup.lin.forward(z[i:i + 1], fresh.delta)[0].double()
            row["retrained_fresh_job"] = out_fresh.tolist()
            row["relative_error_fresh_job"] = float((closed - out_fresh).abs().max()) / scale
        rows.append(row)
        log(f"item {i}: w0 fixed {row['relative_error_w0_fixed']:.1e}, fresh job "
            f"{row.get('relative_error_fresh_job', float('nan')):.1e}")
    meta = {"command": "python -m bench.exact_loo " + " ".join(argv or []),
            "shots": args.shots, "seed": args.seed, "weight_decay": lam,
            "full_fit_seconds": full_seconds, "full_info": full.info,
            "machine": machine_info(), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "items": rows}, indent=1) + "\n")
    table = ["| item | closed-form vs retrained, w0 fixed | vs a fresh job (head refitted) |",
             "|---|---|---|"]
    for row in rows:
        fresh_err = row.get("relative_error_fresh_job")
        table.append(f"| {row['item']} | {row['relative_error_w0_fixed']:.1e} | "
                     + (f"{fresh_err:.1e} |" if fresh_err is not None else "|"))
    text = (f"# Exact leave-one-out at scale\n\n`{meta['command'].strip()}` — {meta['date']}, "
            f"{meta['machine'].get('cpu', '')}\n\nMax |output difference| / max |output| "
            "of the left-out item.\n\n" + "\n".join(table) + "\n")
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
