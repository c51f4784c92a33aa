"""Many classes, few images each: held-out fifth or cross-fitted temperature.

    python -m bench.many_classes                 # 100 classes of 6 images (600 items)
    python -m bench.many_classes --shots 5 --classes 100 30 --seeds 0 1

A held-out fifth of 100 classes of 6 images is one image of every class; cross-fitting
the temperature instead (5 more fits) trains on every item. Which one a default job does
depends on its size and its images per class (lqf_core/config.py). This bench runs, per
class count and seed, the same job both ways (`calibration` "holdout" and "crossfit",
whatever the default would be). It prints each one's dev accuracy, dev ECE, temperature
and time, and for reference the temperature fitted (by likelihood) on the dev images
themselves, with its dev ECE: what a job's calibration aims at, never known to a job.

The classes are pairs (Fashion-MNIST class, digit): 10 classes per garment class, so
`--classes 30` takes the first 3 garment classes. An image is a 28 px garment beside a
28 px digit (scikit-learn's 8 px digits, scaled up), 28 x 56 px. Training images come
from the Fashion-MNIST training pool and digits 0-999, each garment and each digit in one
training image only (before session 28 they were reused across classes, which biased the
held-out temperatures: `pairs`). The dev images are pool images outside the draws and
digits 1000-1796; the t10k test set is not used. Writes docs/results/many-classes.{json,md}
(or --out).
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

from bench.fashion_mnist import dev_indices, few_shot_indices, load_split, to_tensor
from bench.queries import digits_images
from bench.serve import RESULTS, git_commit, machine, write_results
from lqf_core.backbones import load_backbone
from lqf_core.calibration import expected_calibration_error, fit_temperature
from lqf_core.config import Calibration, TrainConfig
from lqf_core.serving import Predictor
from lqf_core.train import train_model

IMAGE_SIZE = 96  # what the input-size rule gives 28 px images
DIGITS_TRAIN = 1000  # digits 0-999 for training pairs, the rest for dev


def pairs(garments: np.ndarray, garment_labels: np.ndarray, digits: np.ndarray,
          digit_labels: np.ndarray, per_class: int, rng: np.random.Generator,
          garment_classes: int = 10, reuse_digits: bool = False
          ) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` images of each of the 10 * garment_classes classes (garment class * 10
    + digit). No garment image is used twice, and no digit image unless `reuse_digits`
    (dev images only). A training image whose garment or digit also sat in a training
    image of another class would make the held-out fifth and the cross-fitted folds
    harder than new images, and so bias the very temperatures this bench compares."""
    chosen_garments: dict[int, np.ndarray] = {}
    for f in range(garment_classes):
        pool = rng.permutation(np.flatnonzero(garment_labels == f))
        if len(pool) < 10 * per_class:
            raise ValueError(f"garment class {f}: {len(pool)} images, {10 * per_class} needed")
        chosen_garments[f] = pool[:10 * per_class].reshape(10, per_class)
    chosen_digits: dict[int, np.ndarray] = {}
    for d in range(10):
        pool = rng.permutation(np.flatnonzero(digit_labels == d))
        need = garment_classes * per_class
        if len(pool) < need and not reuse_digits:
            raise ValueError(f"digit {d}: {len(pool)} images, {need} needed")
        picked = pool[:need] if len(pool) >= need else rng.choice(pool, need)
        chosen_digits[d] = picked.reshape(garment_classes, per_class)
    images, labels = [], []
    for f in range(garment_classes):
        for d in range(10):
            g, k = chosen_garments[f][d], chosen_digits[d][f]
            images.append(np.concatenate([garments[g], digits[k]], axis=2))
            labels += [f * 10 + d] * per_class
    return np.concatenate(images), np.asarray(labels)


def run_job(x: torch.Tensor, labels: list[int], num_classes: int, x_dev: torch.Tensor,
            y_dev: torch.Tensor, crossfit: bool, seed: int, backbone: Any) -> dict[str, Any]:
    # Either way at any size: every item trained on with the temperature cross-fitted, or
    # a fifth held out.
    config = TrainConfig(seed=seed, device="cpu",
                         calibration=Calibration.CROSSFIT if crossfit else Calibration.HOLDOUT)
    started = time.perf_counter()
    model = train_model(x, labels, [str(c) for c in range(num_classes)], config,
                        backbone=backbone)
    seconds = time.perf_counter() - started
    predictor = Predictor(model, device="cpu", backbone=backbone)
    # The logits the served temperature divides: the dev reference refits only T on them.
    logits = predictor.predict_logits(x_dev).double() * model.temperature
    probs = torch.softmax(logits / model.temperature, dim=1)
    dev_t = fit_temperature(logits, y_dev)
    return {"classes": num_classes, "calibration": model.info["calibration"], "seed": seed,
            "trained_items": len(model.info["train_item_ids"]),
            "job_s": round(seconds, 1),
            "dev_accuracy": round(float((probs.argmax(1) == y_dev).double().mean()), 4),
            "dev_ece": round(expected_calibration_error(probs, y_dev), 4),
            "temperature": round(model.temperature, 4),
            "dev_best_t": round(dev_t, 4),
            "dev_best_t_ece": round(expected_calibration_error(
                torch.softmax(logits / dev_t, dim=1), y_dev), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.many_classes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=6)
    parser.add_argument("--classes", type=int, nargs="+", default=[100],
                        help="class counts, each a multiple of 10 up to 100")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--dev-per-class", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS / "many-classes.json")
    args = parser.parse_args(argv)
    if any(c % 10 or not 10 <= c <= 100 for c in args.classes):
        parser.error("--classes: each a multiple of 10 from 10 to 100")
    torch.set_num_threads(2)
    backbone = load_backbone("mobilenet_v2")
    garments, garment_labels = load_split("train")
    from sklearn.datasets import load_digits

    digit_labels = load_digits().target
    digits = digits_images(len(digit_labels))
    # Dev garments lie outside every seed's draw (at most `shots` per Fashion-MNIST class
    # per pair class: 10 pairs per garment class).
    dev_pool = dev_indices(garment_labels, args.shots * 10, args.seeds, 20_000)
    result: dict[str, Any] = {
        "command": " ".join(["python -m bench.many_classes", *(argv or sys.argv[1:])]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "git": git_commit(),
        "machine": machine(), "shots": args.shots,
        "dev_per_class": args.dev_per_class, "runs": []}
    for classes in args.classes:
        x_dev_np, y_dev_np = pairs(garments[dev_pool], garment_labels[dev_pool],
                                   digits[DIGITS_TRAIN:], digit_labels[DIGITS_TRAIN:],
                                   args.dev_per_class, np.random.default_rng(999),
                                   classes // 10, reuse_digits=True)
        x_dev = to_tensor(x_dev_np, IMAGE_SIZE, backbone.mean, backbone.std)
        y_dev = torch.from_numpy(y_dev_np)
        for seed in args.seeds:
            draw = few_shot_indices(garment_labels, args.shots * 10, seed)
            x_np, y_np = pairs(garments[draw], garment_labels[draw], digits[:DIGITS_TRAIN],
                               digit_labels[:DIGITS_TRAIN], args.shots,
                               np.random.default_rng(seed), classes // 10)
            x = to_tensor(x_np, IMAGE_SIZE, backbone.mean, backbone.std)
            for crossfit in (False, True):
                print(f"{classes} classes, seed {seed}: a job on {len(y_np)} items, "
                      f"{'cross-fitted' if crossfit else 'a fifth held out'} ...", flush=True)
                run = run_job(x, y_np.tolist(), classes, x_dev, y_dev, crossfit, seed,
                              backbone)
                print(f"  {run}", flush=True)
                result["runs"].append(run)
    write_results(args.out, result, markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# {result['shots']} images a class: held-out fifth or cross-fitting\n\n"
             f"`{result['command']}` — {result['date']}, git {result['git']}, "
             f"{result['machine']['cpu']} ({result['machine']['nproc']} cores); dev accuracy "
             f"and ECE on {result['dev_per_class']} dev images a class. The last two columns "
             "are a reference only: the temperature fitted (by likelihood) on the dev images "
             "themselves, and its dev ECE.\n",
             "| classes | seed | calibration | items trained | job s | dev accuracy | dev ECE "
             "| T | dev-best T | its ECE |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['classes']} | {r['seed']} | {r['calibration']} | {r['trained_items']} | "
              f"{r['job_s']} | {r['dev_accuracy']} | {r['dev_ece']} | {r['temperature']} | "
              f"{r['dev_best_t']} | {r['dev_best_t_ece']} |"
              for r in result["runs"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
