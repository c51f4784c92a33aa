"""Jacobian products from layer signals against cached linear maps, in one run.

    python -m bench.products            # -> docs/results/products.{json,md}

For each seed it draws the 100-shot Fashion-MNIST training set (1,000 items) as
`bench.transfer` does and trains LQF on all of it with `train_model` (the input size a
job chooses for 28 px images), once with J's products taken from recorded layer signals
(`lqf_core.signals`, the default where they fit) and once from cached linear maps (the
products before), for each objective: the default early stop and the converged K-FAC-
metric ridge. The two product paths run back to back, so their ratio is measured under
the same load. It reports the fit's time, the solver's iterations and relative gradient
norm, the dev accuracy on 2,000 training-pool images outside every seed's training set
(the t10k test set is not read), and how far the two paths' dev outputs differ.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench.fashion_mnist import (
    CLASS_NAMES,
    dev_indices,
    few_shot_indices,
    input_size,
    load_split,
    to_tensor,
)
from bench.transfer import log, machine_info
from lqf_core import signals
from lqf_core.backbones import load_backbone
from lqf_core.classifier import build_classifier
from lqf_core.config import TrainConfig
from lqf_core.train import train_model

OBJECTIVES: dict[str, dict] = {
    "early stop (default)": {},
    "kfac mu=10, tol 1e-4": {"regularizer": "kfac", "metric_strength": 10.0, "tol": 1e-4,
                             "max_iters": 500},
}
PATHS = ("signals", "linear maps")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.products", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--dev-size", type=int, default=2000)
    parser.add_argument("--objectives", nargs="+", choices=list(OBJECTIVES),
                        default=list(OBJECTIVES))
    parser.add_argument("--out", type=Path, default=Path("docs/results/products.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    backbone = load_backbone("mobilenet_v2")
    x_pool, y_pool = load_split("train")
    dev = dev_indices(y_pool, args.shots, args.seeds, args.dev_size)
    y_dev = torch.from_numpy(y_pool[dev])
    size = input_size(TrainConfig(), backbone)
    x_dev = to_tensor(x_pool[dev], size, backbone.mean, backbone.std)
    default_budget = signals.MAX_BYTES
    runs = []
    for seed in args.seeds:
        idx = few_shot_indices(y_pool, args.shots, seed)
        x = to_tensor(x_pool[idx], size, backbone.mean, backbone.std)
        labels = y_pool[idx].tolist()
        for objective in args.objectives:
            logits_by_path = {}
            for path in PATHS:
                # A budget of 0 bytes: the signals never fit, the fit keeps the maps.
                signals.MAX_BYTES = default_budget if path == "signals" else 0
                config = TrainConfig.from_dict({"method": "lqf", "seed": seed, "device": "cpu",
                                                "val_fraction": 0.0,
                                                **OBJECTIVES[objective]})
                started = time.monotonic()
                model = train_model(x, labels, CLASS_NAMES, config, backbone=backbone)
                seconds = time.monotonic() - started
                with torch.no_grad():
                    classifier = build_classifier(model, backbone, torch.device("cpu"))
                    logits = torch.cat([classifier.logits(x_dev[i:i + 250])
                                        for i in range(0, len(x_dev), 250)])
                logits_by_path[path] = logits
                acc = float((logits.argmax(1) == y_dev).float().mean())
                runs.append({"seed": seed, "objective": objective, "products": path,
                             "train_seconds": seconds, "dev_accuracy": acc,
                             **{k: model.info.get(k) for k in
                                ("solver_iterations", "relative_grad_norm",
                                 "solver_converged")}})
                log(f"seed {seed} {objective} {path}: {seconds:.1f} s, "
                    f"{runs[-1]['solver_iterations']} its, dev {acc:.4f}")
            difference = logits_by_path["signals"] - logits_by_path["linear maps"]
            runs[-1]["max_abs_output_difference"] = float(difference.abs().max())
            runs[-1]["output_scale"] = float(logits_by_path["linear maps"].abs().max())
            runs[-1]["same_predictions"] = float(
                (logits_by_path["signals"].argmax(1)
                 == logits_by_path["linear maps"].argmax(1)).float().mean())
    signals.MAX_BYTES = default_budget
    command = "python -m bench.products " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    meta = {"command": command.strip(), "shots": args.shots, "seeds": args.seeds,
            "image_size": size, "dev_size": args.dev_size, "machine": machine_info(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    text = markdown(runs, meta)
    args.out.with_suffix(".md").write_text(text)
    print(text)


def markdown(runs: list[dict], meta: dict) -> str:
    lines = [f"# Jacobian products: layer signals against linear maps\n\n`{meta['command']}` "
             f"— {meta['date']}, {meta['machine'].get('cpu', '')}, "
             f"{meta['machine'].get('cores', '')} cores\n\n"
             f"{meta['shots']}-shot Fashion-MNIST, every item trained on, {meta['image_size']} "
             f"px; dev accuracy on {meta['dev_size']} training-pool images.\n",
             "| seed | objective | products | fit s | ratio to linear maps | solver its "
             "| rel. grad norm | dev accuracy | max abs dev output difference (scale) "
             "| same predictions |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        twin = next(r for r in runs if r["seed"] == run["seed"]
                    and r["objective"] == run["objective"] and r["products"] == "linear maps")
        ratio = run["train_seconds"] / twin["train_seconds"]
        diff = (f"{run['max_abs_output_difference']:.1e} ({run['output_scale']:.1f})"
                if "max_abs_output_difference" in run else "")
        same = f"{100 * run['same_predictions']:.2f} %" if "same_predictions" in run else ""
        lines.append(f"| {run['seed']} | {run['objective']} | {run['products']} | "
                     f"{run['train_seconds']:.1f} | {ratio:.2f} | {run['solver_iterations']} | "
                     f"{run['relative_grad_norm']:.1e} | {100 * run['dev_accuracy']:.2f} | "
                     f"{diff} | {same} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
