"""Many classes, few images each: what a default job's held-out fifth costs there.

    python -m bench.many_classes                 # 100 classes of 6 images (600 items)
    python -m bench.many_classes --shots 8 --seeds 0 1

A default LQF job cross-fits its temperature (5 more fits; every item trained on) up to
CROSSFIT_CALIBRATION_MAX_ITEMS = 500 items, and holds out a fifth above that. With 100
classes of 6 images that fifth is one image of every class. This bench runs, per seed,
the default job as it is (holdout) and the same job with cross-fitting forced (the item
limit raised for that job only), and prints each one's dev accuracy, dev ECE and time.

The 100 classes are pairs (Fashion-MNIST class, digit). An image is a 28 px garment
beside a 28 px digit (scikit-learn's 8 px digits, scaled up), 28 x 56 px. Training
images come from the Fashion-MNIST training pool and digits 0-999. The dev images are
pool images outside the draws and digits 1000-1796; the t10k test set is not used.
Writes docs/results/many-classes.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lqf_core.train as train_module
from bench.fashion_mnist import dev_indices, few_shot_indices, load_split, to_tensor
from bench.queries import digits_images
from bench.serve import RESULTS, git_commit, machine, write_results
from lqf_core.backbones import load_backbone
from lqf_core.calibration import expected_calibration_error
from lqf_core.config import TrainConfig
from lqf_core.serving import Predictor

IMAGE_SIZE = 96  # what the input-size rule gives 28 px images
DIGITS_TRAIN = 1000  # digits 0-999 for training pairs, the rest for dev


def pairs(garments: np.ndarray, garment_labels: np.ndarray, digits: np.ndarray,
          digit_labels: np.ndarray, per_class: int, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` images of each of the 100 classes (garment class * 10 + digit)."""
    images, labels = [], []
    for f in range(10):
        for d in range(10):
            g = rng.choice(np.flatnonzero(garment_labels == f), per_class, replace=False)
            k = rng.choice(np.flatnonzero(digit_labels == d), per_class)
            images.append(np.concatenate([garments[g], digits[k]], axis=2))
            labels += [f * 10 + d] * per_class
    return np.concatenate(images), np.asarray(labels)


def run_job(x: torch.Tensor, labels: list[int], x_dev: torch.Tensor, y_dev: torch.Tensor,
            crossfit: bool, seed: int, backbone: Any) -> dict[str, Any]:
    limit = train_module.CROSSFIT_CALIBRATION_MAX_ITEMS
    if crossfit:  # this job only: every item trained on, the temperature cross-fitted
        train_module.CROSSFIT_CALIBRATION_MAX_ITEMS = len(labels)
    try:
        started = time.perf_counter()
        model = train_module.train_model(x, labels, [str(c) for c in range(100)],
                                         TrainConfig(seed=seed, device="cpu"),
                                         backbone=backbone)
        seconds = time.perf_counter() - started
    finally:
        train_module.CROSSFIT_CALIBRATION_MAX_ITEMS = limit
    probs = torch.from_numpy(Predictor(model, device="cpu", backbone=backbone)
                             .predict_batch(x_dev))
    return {"calibration": model.info["calibration"], "seed": seed,
            "trained_items": len(model.info["train_item_ids"]),
            "job_s": round(seconds, 1),
            "dev_accuracy": round(float((probs.argmax(1) == y_dev).double().mean()), 4),
            "dev_ece": round(expected_calibration_error(probs, y_dev), 4),
            "temperature": round(model.temperature, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.many_classes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--dev-per-class", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS / "many-classes.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    backbone = load_backbone("mobilenet_v2")
    garments, garment_labels = load_split("train")
    from sklearn.datasets import load_digits

    digit_labels = load_digits().target
    digits = digits_images(len(digit_labels))
    # Dev garments lie outside every seed's draw (at most `shots` per Fashion-MNIST class
    # per pair class: 10 pairs per garment class).
    dev_pool = dev_indices(garment_labels, args.shots * 10, args.seeds, 20_000)
    x_dev_np, y_dev_np = pairs(garments[dev_pool], garment_labels[dev_pool],
                               digits[DIGITS_TRAIN:], digit_labels[DIGITS_TRAIN:],
                               args.dev_per_class, np.random.default_rng(999))
    x_dev = to_tensor(x_dev_np, IMAGE_SIZE, backbone.mean, backbone.std)
    y_dev = torch.from_numpy(y_dev_np)
    result: dict[str, Any] = {
        "command": " ".join(["python -m bench.many_classes", *(argv or sys.argv[1:])]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "git": git_commit(),
        "machine": machine(), "classes": 100, "shots": args.shots,
        "dev_images": len(y_dev), "runs": []}
    for seed in args.seeds:
        draw = few_shot_indices(garment_labels, args.shots * 10, seed)
        x_np, y_np = pairs(garments[draw], garment_labels[draw], digits[:DIGITS_TRAIN],
                           digit_labels[:DIGITS_TRAIN], args.shots,
                           np.random.default_rng(seed))
        x = to_tensor(x_np, IMAGE_SIZE, backbone.mean, backbone.std)
        for crossfit in (False, True):
            print(f"seed {seed}: a default job on {len(y_np)} items, "
                  f"{'cross-fitted' if crossfit else 'as it is'} ...", flush=True)
            run = run_job(x, y_np.tolist(), x_dev, y_dev, crossfit, seed, backbone)
            print(f"  {run}", flush=True)
            result["runs"].append(run)
    write_results(args.out, result, markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# 100 classes of {result['shots']} images: held-out fifth or cross-fitting\n\n"
             f"`{result['command']}` — {result['date']}, git {result['git']}, "
             f"{result['machine']['cpu']} ({result['machine']['nproc']} cores); dev accuracy "
             f"and ECE on {result['dev_images']} dev images.\n",
             "| seed | calibration | items trained | job s | dev accuracy | dev ECE | T |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['calibration']} | {r['trained_items']} | {r['job_s']} | "
              f"{r['dev_accuracy']} | {r['dev_ece']} | {r['temperature']} |"
              for r in result["runs"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
