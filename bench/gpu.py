"""GPU check: train, serve and query one default LQF model on CUDA and on the CPU, timed.

    python -m bench.gpu            # 100 shots of Fashion-MNIST -> docs/results/gpu.{json,md}
    python -m bench.gpu --quick    # 20 shots, fewer timed batches (a few minutes on a CPU)

For each device (CUDA first when present, then the CPU): a default `lqf` job's fit
(`train_model`, mobilenet_v2 at its defaults), `Predictor.predict_batch` throughput on
batches of 64 test images, and the closed-form queries the service runs (posterior
build, K-FAC uncertainty of 64 images, first-order influence of one image, a batch of 100
to label chosen from the test images). It checks
that both devices predict the same classes. Seeded synthetic images stand in when
Fashion-MNIST is not installed (`apt-get install dataset-fashion-mnist`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.fashion_mnist import CLASS_NAMES, few_shot_indices, input_size, load_split, to_tensor
from bench.transfer import machine_info
from lqf_core.active import head_posterior_of, lqf_signals, select_batch
from lqf_core.artifacts import save_model
from lqf_core.backbones import load_backbone
from lqf_core.config import TrainConfig
from lqf_core.posterior import LQFPosterior
from lqf_core.serving import Predictor
from lqf_core.train import train_model

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def data(shots: int, n_test: int, size: int, backbone: Any) -> tuple[Any, ...]:
    try:
        x_pool, y_pool = load_split("train")
        x_test, _ = load_split("t10k")
        source = "fashion-mnist"
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        y_pool = np.repeat(np.arange(10), shots + 5)
        x_pool = (rng.random((len(y_pool), 28, 28)) * 60 + 20 * y_pool[:, None, None])
        x_pool = x_pool.clip(0, 255).astype(np.uint8)
        x_test, source = x_pool[:n_test], "synthetic"
    idx = few_shot_indices(y_pool, shots, 0)
    x = to_tensor(x_pool[idx], size, backbone.mean, backbone.std)
    return x, y_pool[idx].tolist(), to_tensor(x_test[:n_test], size, backbone.mean,
                                              backbone.std), source


def timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - started


def run(device: str, x: torch.Tensor, labels: list[int], x_test: torch.Tensor,
        batches: int) -> dict[str, Any]:
    backbone = load_backbone("mobilenet_v2")
    config = TrainConfig(device=device)
    model, train_s = timed(lambda: train_model(x, labels, CLASS_NAMES, config,
                                               backbone=backbone), device)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, tmp)
        predictor = Predictor.load(tmp, device=device)
    batch = x_test[:64]
    predictor.predict_batch(batch)  # warm-up
    _, predict_s = timed(lambda: [predictor.predict_batch(batch) for _ in range(batches)],
                         device)
    classes = predictor.predict_batch(x_test).argmax(1)
    dev = predictor.device
    prefix = predictor.backbone.split(model.config.suffix)[0].to(dev).eval()
    fit = [int(i) for i in model.info["train_item_ids"]]

    def features(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([prefix(images[i:i + 64].to(dev)) for i in range(0, len(images),
                                                                               64)])

    post, build_s = timed(lambda: LQFPosterior(
        model, predictor.backbone, features(x[fit]), torch.tensor(labels)[fit], device=dev,
        dtype=torch.float32), device)
    post.uncertainty(features(batch[:2]))  # K-FAC factors and the OOD reference, once
    _, uncertainty_s = timed(lambda: post.uncertainty(features(batch)), device)
    _, influence_s = timed(lambda: post.influence(features(batch[:1]), exact=False,
                                                  with_loo=False), device)
    pool = lqf_signals(model, predictor.backbone, features(x_test))
    _, rank_s = timed(lambda: select_batch(head_posterior_of(post), pool, 100), device)
    return {"device": device, "train_s": round(train_s, 2),
            "predict_images_per_s": round(batches * len(batch) / predict_s, 1),
            "posterior_build_s": round(build_s, 2),
            "uncertainty_64_s": round(uncertainty_s, 3),
            "influence_s": round(influence_s, 3),
            "rank_100_of_pool_s": round(rank_s, 3),
            "solver_iterations": model.info.get("solver_iterations"),
            "classes": classes.tolist()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    shots, n_test, batches = (20, 256, 5) if args.quick else (100, 1000, 20)
    backbone = load_backbone("mobilenet_v2")
    x, labels, x_test, source = data(shots, n_test, input_size(TrainConfig(), backbone), backbone)
    devices = (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]
    runs = []
    for device in devices:
        print(f"{device}: training on {len(labels)} {source} images ...", flush=True)
        runs.append(run(device, x, labels, x_test, batches))
    result: dict[str, Any] = {
        "command": "python -m bench.gpu" + (" --quick" if args.quick else ""),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_info(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "data": {"source": source, "train_images": len(labels), "test_images": n_test},
        "runs": [{k: v for k, v in r.items() if k != "classes"} for r in runs]}
    if len(runs) == 2:
        same = np.mean(np.array(runs[0]["classes"]) == np.array(runs[1]["classes"]))
        result["prediction_agreement"] = round(float(same), 4)
    lines = ["| device | train s | predict img/s (batch 64) | posterior build s | "
             "uncertainty, 64 images s | influence s | rank 100 of the test images s |",
             "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['device']} | {r['train_s']} | {r['predict_images_per_s']} | "
                     f"{r['posterior_build_s']} | {r['uncertainty_64_s']} | "
                     f"{r['influence_s']} | {r['rank_100_of_pool_s']} |")
    table = "\n".join(lines)
    print("\n" + table)
    if "prediction_agreement" in result:
        print(f"CUDA and CPU predict the same class for "
              f"{100 * result['prediction_agreement']:.2f} % of test images")
    else:
        print("no CUDA device: CPU only")
    out = args.out or RESULTS / ("gpu-quick.json" if args.quick else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(f"# GPU check\n\n`{result['command']}` — {result['date']}"
                                      f", {result['gpu'] or 'no GPU'}\n\n{table}\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
