"""Active learning on Fashion-MNIST: which images to label next, on one LQF model.

    python -m bench.active                        # 5 seeds, 20 -> 500 labels, +60 a round
    python -m bench.active --seeds 0 --rounds 2   # a quick look

A fixed pool of `--pool` training-split images and `--test` t10k images (the test set
is only ever scored, never used to choose anything). Each seed starts from 2 random
labels per class. Every round, for each strategy, an LQF job with the service's
defaults except `suffix_blocks` (`--suffix-blocks`, 1 by default: 225 trainings must
fit in this machine's time; stated in docs/benchmarks.md) is trained on that strategy's
labels, its test accuracy recorded, and the strategy picks the next `--per-round` images:
  random    uniformly among the unlabeled;
  entropy   the highest predictive entropy (temperature-scaled, as /predict answers);
  margin    the smallest gap between the two most probable classes;
  coreset   k-center greedy on the head's input features (Sener & Savarese 2018);
  lqf       lqf_core.active.select_batch: the flip probability under the head block of
            the posterior, conditioned exactly on each earlier pick of the batch.
The labels an oracle gives are the true ones. A second table compares the first 20
labels chosen by the cold start (lqf_core.active.cold_start_batch, no labels) with 20
random ones. Then the cost of ranking: a pool of 10,000 for a batch of 100 with a
default (4-block) model, each step timed. Writes docs/results/active.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.fashion_mnist import CLASS_NAMES, few_shot_indices, input_size, load_split, to_tensor
from bench.transfer import machine_info
from lqf_core.active import (
    ConditionedKernel,
    HeadPosterior,
    LQFSignals,
    cold_start_batch,
    lqf_signals,
    select_batch,
)
from lqf_core.backbones import Backbone, load_backbone
from lqf_core.config import TrainConfig
from lqf_core.model import TrainedModel
from lqf_core.train import train_model

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
STRATEGIES = ("random", "entropy", "margin", "coreset", "lqf")


class Pool:
    """Images, labels and cached prefix outputs of the pool and of the test set."""

    def __init__(self, backbone: Backbone, config: TrainConfig, pool: int, test: int):
        x_train, y_train = load_split("train")
        x_test, y_test = load_split("t10k")
        rng = np.random.default_rng(1234)
        idx = rng.choice(len(y_train), pool, replace=False)
        size = input_size(config, backbone)
        self.x = to_tensor(x_train[idx], size, backbone.mean, backbone.std)
        self.y = y_train[idx]
        self.x_test = to_tensor(x_test[:test], size, backbone.mean, backbone.std)
        self.y_test = y_test[:test]
        assert config.suffix_blocks is not None
        prefix = backbone.split(config.suffix_blocks)[0].eval()
        with torch.no_grad():
            self.z = torch.cat([prefix(self.x[i:i + 256]) for i in range(0, len(self.x), 256)])
            self.z_test = torch.cat([prefix(self.x_test[i:i + 256])
                                     for i in range(0, len(self.x_test), 256)])
        self.cache = {str(i): self.z[i] for i in range(len(self.z))}


def train(pool: Pool, labelled: list[int], config: TrainConfig,
          backbone: Backbone) -> tuple[TrainedModel, list[int]]:
    """An LQF model on the labelled pool items -> (model, its classes' global indices)."""
    present = sorted({int(pool.y[i]) for i in labelled})
    local = {c: k for k, c in enumerate(present)}
    model = train_model(pool.x[labelled], [local[int(pool.y[i])] for i in labelled],
                        [CLASS_NAMES[c] for c in present], config, backbone=backbone,
                        item_ids=[str(i) for i in labelled], prefix_cache=pool.cache)
    return model, present


def test_accuracy(model: TrainedModel, present: list[int], pool: Pool,
                  backbone: Backbone) -> float:
    outputs = lqf_signals(model, backbone, pool.z_test).outputs
    predicted = np.array(present)[outputs.argmax(1).numpy()]
    return float((predicted == pool.y_test).mean())


def k_center(features: torch.Tensor, labelled: list[int], candidates: np.ndarray,
             b: int) -> list[int]:
    """Greedy k-center: each pick the candidate farthest from every chosen centre."""
    distance = torch.cdist(features[candidates], features[labelled]).min(1).values
    picks: list[int] = []
    for _ in range(b):
        j = int(distance.argmax())
        picks.append(int(candidates[j]))
        distance = torch.minimum(distance, torch.cdist(features[candidates],
                                                       features[candidates[j]][None])[:, 0])
        distance[j] = -1
    return picks


def pick(strategy: str, model: TrainedModel, pool: Pool, labelled: list[int], b: int,
         backbone: Backbone, rng: np.random.Generator) -> list[int]:
    candidates = np.setdiff1d(np.arange(len(pool.y)), labelled)
    if strategy == "random":
        return rng.choice(candidates, b, replace=False).tolist()
    signals = lqf_signals(model, backbone, pool.z)
    unlabelled = LQFSignals(signals.features[candidates], signals.outputs[candidates])
    probs = torch.softmax(unlabelled.outputs.double() / model.temperature, dim=1)
    if strategy == "entropy":
        score = -(probs * probs.clamp_min(1e-30).log()).sum(1)
        return candidates[score.argsort(descending=True)[:b].numpy()].tolist()
    if strategy == "margin":
        top = probs.topk(2, dim=1).values
        return candidates[(top[:, 0] - top[:, 1]).argsort()[:b].numpy()].tolist()
    if strategy == "coreset":
        return k_center(signals.features, labelled, candidates, b)
    fit = [int(i) for i in model.info["train_item_ids"]]
    labels = torch.tensor([int(model.class_names.index(CLASS_NAMES[int(pool.y[i])]))
                           for i in fit])
    train_signals = LQFSignals(signals.features[fit], signals.outputs[fit])
    head = HeadPosterior.of(model, train_signals, labels)
    return candidates[select_batch(head, unlabelled, b).order].tolist()


def run_curves(pool: Pool, config: TrainConfig, backbone: Backbone, seeds: list[int],
               rounds: int, per_round: int, strategies: list[str],
               log: Callable[[str], None]) -> dict[str, Any]:
    curves: dict[str, list[list[float]]] = {s: [] for s in strategies}
    seconds: dict[str, float] = dict.fromkeys(strategies, 0.0)
    labels_axis: list[int] = []
    for seed in seeds:
        start = few_shot_indices(pool.y, 2, seed).tolist()
        for strategy in strategies:
            rng = np.random.default_rng(seed)
            labelled, accuracies = list(start), []
            labels_axis = []
            for r in range(rounds + 1):
                model, present = train(pool, labelled, config, backbone)
                accuracies.append(test_accuracy(model, present, pool, backbone))
                labels_axis.append(len(labelled))
                log(f"seed {seed} {strategy:8s} {len(labelled):4d} labels: "
                    f"{100 * accuracies[-1]:.2f} %")
                if r < rounds:
                    started = time.perf_counter()
                    labelled += pick(strategy, model, pool, labelled, per_round, backbone, rng)
                    seconds[strategy] += time.perf_counter() - started
            curves[strategy].append(accuracies)
    return {"labels": labels_axis, "accuracy": curves,
            "selection_seconds_total": {s: round(v, 1) for s, v in seconds.items()}}


def labels_to_reach(labels: list[int], curve: np.ndarray, level: float) -> float | None:
    """Labels at which the mean curve first reaches `level` (linear between rounds)."""
    for i, value in enumerate(curve):
        if value >= level:
            if i == 0:
                return float(labels[0])
            a, b = curve[i - 1], value
            return labels[i - 1] + (level - a) / (b - a) * (labels[i] - labels[i - 1])
    return None


def cold_start_comparison(pool: Pool, config: TrainConfig, backbone: Backbone,
                          seeds: list[int], b: int) -> dict[str, Any]:
    """Accuracy after b labels chosen by the cold start (from the pre-trained features of
    the whole backbone; seeded) against b uniformly random ones."""
    blocks = torch.nn.Sequential(*backbone.blocks).eval()
    with torch.no_grad():
        features = torch.cat([blocks(pool.x[i:i + 256]) for i in range(0, len(pool.x), 256)])
    out: dict[str, list[float]] = {"cold_start": [], "random": []}
    classes: dict[str, list[int]] = {"cold_start": [], "random": []}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        chosen = {"cold_start": cold_start_batch(features, b, seed=seed).order,
                  "random": rng.choice(len(pool.y), b, replace=False).tolist()}
        for name, labelled in chosen.items():
            model, present = train(pool, labelled, config, backbone)
            out[name].append(test_accuracy(model, present, pool, backbone))
            classes[name].append(len(present))
    return {"labels": b, "accuracy": out, "classes_covered": classes}


def ranking_cost(backbone: Backbone, pool_size: int, b: int) -> dict[str, float]:
    """Seconds of each step of ranking `pool_size` images for a batch of b with a default
    model (trained on 100 labels of the pool), and how exact the conditioning was at this
    scale (dense_check)."""
    config = TrainConfig()
    assert backbone.default_suffix_blocks is not None
    config = config.replace(suffix_blocks=backbone.default_suffix_blocks)
    x_train, y_train = load_split("train")
    rng = np.random.default_rng(99)
    idx = rng.choice(len(y_train), pool_size + 100, replace=False)
    x = to_tensor(x_train[idx], config.image_size, backbone.mean, backbone.std)
    y = y_train[idx]
    labelled = few_shot_indices(y[:pool_size + 100], 10, 0)
    model = train_model(x[labelled], y[labelled].tolist(), CLASS_NAMES, config,
                        backbone=backbone)
    prefix = backbone.split(config.suffix)[0].eval()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with torch.no_grad():
        z = torch.cat([prefix(x[i:min(i + 256, pool_size)])
                       for i in range(0, pool_size, 256)])
    timings["prefix_pass_s"] = time.perf_counter() - started
    started = time.perf_counter()
    signals = lqf_signals(model, backbone, z)
    timings["signals_s"] = time.perf_counter() - started
    fit = [int(labelled[int(i)]) for i in model.info["train_item_ids"]]
    started = time.perf_counter()
    with torch.no_grad():
        z_fit = prefix(x[fit])
    train_signals = lqf_signals(model, backbone, z_fit)
    head = HeadPosterior.of(model, train_signals, torch.tensor(y[fit]))
    timings["head_posterior_s"] = time.perf_counter() - started
    started = time.perf_counter()
    ranking = select_batch(head, signals, b)
    timings["selection_s"] = time.perf_counter() - started
    timings["total_s"] = sum(timings.values())
    out: dict[str, float] = {k: round(v, 2) for k, v in timings.items()}
    out["conditioned_variance_max_rel_error"] = dense_check(model, train_signals, signals,
                                                            head, ranking.order)
    return out


def dense_check(model: TrainedModel, train: LQFSignals, pool: LQFSignals,
                head: HeadPosterior, picks: list[int]) -> float:
    """Max relative error, over the pool, of the variances after all picks (the rank-C
    updates) against sigma^2 phi^T (Phi^T Phi + Gamma + Phi_picks^T Phi_picks)^-1 phi
    solved densely in float64 (isotropic objective, the default)."""
    kernel = ConditionedKernel(pool.features, head.covariance, head.noise, len(picks))
    for s in picks:
        kernel.condition(s)
    phi, phi_pool = train.features.double(), pool.features.double()
    picked = phi_pool[picks]
    precision = phi.T @ phi + picked.T @ picked
    precision += len(phi) * model.config.ridge * torch.eye(len(precision), dtype=torch.float64)
    dense = head.noise * (phi_pool * torch.linalg.solve(precision, phi_pool.T).T).sum(1)
    return float(((kernel.variance - dense).abs() / dense).max())


def summary_table(result: dict[str, Any]) -> str:
    labels = result["curves"]["labels"]
    strategies = list(result["curves"]["accuracy"])
    shown = sorted({0, len(labels) // 4, len(labels) // 2, 3 * len(labels) // 4, len(labels) - 1})
    head = "| strategy | " + " | ".join(f"{labels[i]} labels" for i in shown) + " | mean |"
    lines = [head, "|---" * (len(shown) + 2) + "|"]
    for s in strategies:
        curves = 100 * np.array(result["curves"]["accuracy"][s])
        mean, std = curves.mean(0), curves.std(0)
        cells = " | ".join(f"{mean[i]:.2f} ± {std[i]:.2f}" for i in shown)
        lines.append(f"| {s} | {cells} | {mean.mean():.2f} |")
    lines += ["", "| accuracy level (margin's mean curve) | labels, margin | labels, lqf "
              "| saved |", "|---|---|---|---|"]
    for row in result["labels_saved"]:
        lqf = "not reached" if row["lqf"] is None else f"{row['lqf']:.0f}"
        saved = "" if row["saved_fraction"] is None else f"{100 * row['saved_fraction']:.1f} %"
        lines.append(f"| {100 * row['level']:.2f} % | {row['margin']:.0f} | {lqf} | {saved} |")
    cold = result.get("cold_start")
    if cold:
        c = 100 * np.array(cold["accuracy"]["cold_start"])
        r = 100 * np.array(cold["accuracy"]["random"])
        lines += ["", f"| first {cold['labels']} labels | mean accuracy | seeds |", "|---|---|---|",
                  f"| cold start | {c.mean():.2f} ± {c.std():.2f} | {len(c)} |",
                  f"| random | {r.mean():.2f} ± {r.std():.2f} | {len(r)} |"]
    cost = result.get("ranking_cost")
    if cost:
        lines += ["", "| ranking cost (pool 10,000, batch 100, default model) | value |",
                  "|---|---|"] + [f"| {k} | {v} |" for k, v in cost.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.active", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-round", type=int, default=60)
    parser.add_argument("--pool", type=int, default=5000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--suffix-blocks", type=int, default=1)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--cost-only", action="store_true",
                        help="only the ranking cost (run it alone: it is timed)")
    parser.add_argument("--out", type=Path, default=RESULTS / "active.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    backbone = load_backbone("mobilenet_v2")
    if args.cost_only:
        cost = ranking_cost(backbone, 10_000, 100)
        print(json.dumps(cost, indent=1))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": "python -m bench.active --cost-only",
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_info(), "ranking_cost": cost}, indent=1) + "\n")
        return 0
    config = TrainConfig(suffix_blocks=args.suffix_blocks)
    started = time.perf_counter()
    pool = Pool(backbone, config, args.pool, args.test)
    result: dict[str, Any] = {
        "command": " ".join(["python -m bench.active", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_info(),
        "protocol": {"pool": args.pool, "test": args.test, "seeds": args.seeds,
                     "rounds": args.rounds, "per_round": args.per_round,
                     "start": "2 random labels per class",
                     "model": f"lqf, service defaults, suffix_blocks={args.suffix_blocks}"}}
    result["curves"] = run_curves(pool, config, backbone, args.seeds, args.rounds,
                                  args.per_round, args.strategies,
                                  lambda line: print(line, flush=True))
    labels = result["curves"]["labels"]
    acc = {s: np.array(c).mean(0) for s, c in result["curves"]["accuracy"].items()}
    result["labels_saved"] = []
    if "margin" in acc and "lqf" in acc:
        # Two levels on margin's own curve: what it reaches at a third and at the end.
        for i in sorted({len(labels) // 3, len(labels) - 1}):
            level = float(acc["margin"][i])
            margin_labels = labels_to_reach(labels, acc["margin"], level)
            lqf_labels = labels_to_reach(labels, acc["lqf"], level)
            saved = None if lqf_labels is None or margin_labels is None else (
                1 - lqf_labels / margin_labels)
            result["labels_saved"].append({"level": level, "margin": margin_labels,
                                           "lqf": lqf_labels, "saved_fraction": saved})
    result["cold_start"] = cold_start_comparison(pool, config, backbone, args.seeds, 20)
    if not args.skip_cost:
        result["ranking_cost"] = ranking_cost(backbone, 10_000, 100)
    result["seconds"] = round(time.perf_counter() - started, 1)
    table = summary_table(result)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(
        f"# Active learning\n\n`{result['command']}` — {result['date']}, "
        f"{result['machine']['cpu']} ({result['machine']['cores']} cores)\n\n{table}\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
