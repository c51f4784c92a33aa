"""One LQF fit on several processes: measured here, then modelled past this machine.

    python -m bench.scale                       # -> docs/results/scale.{json,md}
    python -m bench.scale --items 2000 --ranks 1 2 4

On Fashion-MNIST training images (the first --items of the 100-shot draws, seed 0), a
default LQF job's fit (ImageNet MobileNetV2, the input-size rule's 96 px, 4 linearized
blocks, 10 PCG iterations) runs on 1, 2, ... processes of this host (torch.distributed,
gloo), each on a shard of the items, as a `workers: N` job runs it. Rank 0 records:
- the prefix pass, K-FAC pass and the time per solver iteration;
- the bytes it all-reduced per iteration (one parameter-sized vector: J^T J p);
- its peak resident memory, per item of its shard.
From the one-process run it then models a fit of 100k and 1M items on 1, 8 and 64 GPUs:
time = (prefix + K-FAC + iterations x product) per item / W + iterations x all-reduce.
The GPU's speed against this CPU and the interconnects are ASSUMPTIONS (flags), printed
with the table; nothing here has run on a GPU. The test images are not used.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from bench.fashion_mnist import few_shot_indices, input_size, load_split, to_tensor
from bench.transfer import machine_info
from lqf_core.backbones import load_backbone
from lqf_core.config import TrainConfig
from lqf_core.distributed import Shard, ranks, shard_slice
from lqf_core.linearize import batches
from lqf_core.lqf import fit_lqf

CPU = torch.device("cpu")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_rank(x: torch.Tensor, y: torch.Tensor, config: TrainConfig, shard: Shard) -> dict:
    """One rank's fit, timed stage by stage (every rank runs this; rank 0 reports)."""
    backbone = load_backbone(config.backbone)
    baseline = peak_rss_bytes()
    prefix = backbone.split(config.suffix)[0]
    started = time.monotonic()
    with torch.no_grad():
        z = torch.cat([prefix(x[sl]) for sl in batches(len(x), config.batch_size)])
    prefix_s = time.monotonic() - started
    marks: dict[str, float] = {}
    steps: list[tuple[float, int]] = []

    def on_kfac(i: int, n: int) -> None:
        marks.setdefault("kfac_first", time.monotonic())
        marks["kfac_last"] = time.monotonic()

    def on_step(i: int, metrics: dict[str, float]) -> None:
        steps.append((time.monotonic(), shard.reduced_bytes))

    fit_started = time.monotonic()
    fit = fit_lqf(backbone, z, y, 10, config, CPU, on_kfac=on_kfac, on_step=on_step,
                  shard=shard)
    fit_s = time.monotonic() - fit_started
    per_iter = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(steps, steps[1:], strict=False)]
    return {"delta": fit.delta.detach().cpu(), "items": len(y), "prefix_seconds": prefix_s,
            "setup_and_kfac_seconds": marks["kfac_last"] - fit_started,
            "seconds_per_iteration": float(np.median([s for s, _ in per_iter])),
            "bytes_per_iteration": int(np.median([b for _, b in per_iter])),
            "fit_seconds": fit_s, "iterations": fit.info["solver_iterations"],
            "parameters": fit.setup.lin.num_params,
            "peak_rss_bytes": peak_rss_bytes(), "rss_growth_bytes": peak_rss_bytes() - baseline}


def _helper(x: torch.Tensor, y: torch.Tensor, config: TrainConfig, shard: Shard) -> None:
    run_rank(x, y, config, shard)


def measure(world: int, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> dict:
    """One fit on `world` ranks, in a fresh process (so its peak memory is its own)."""
    context = mp.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_measure, world, x, y, config).result()


def _measure(world: int, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> dict:
    parts = [shard_slice(len(y), r, world) for r in range(world)]
    helpers = [functools.partial(_helper, x[p], y[p], config) for p in parts[1:]]
    started = time.monotonic()
    with ranks(world, CPU, helpers) as shard:
        result = run_rank(x[parts[0]], y[parts[0]], config, shard)
    return {"ranks": world, "wall_seconds": time.monotonic() - started, **result}


def ring_allreduce_seconds(nbytes: float, world: int, bandwidth: float, latency: float) -> float:
    """A ring all-reduce: each rank sends and receives 2 (W-1)/W of the vector."""
    if world == 1:
        return 0.0
    return 2 * (world - 1) / world * nbytes / bandwidth + 2 * (world - 1) * latency


def model(one: dict, memory_per_item: float, args: argparse.Namespace) -> list[dict]:
    n = one["items"]
    per_item = {"prefix": one["prefix_seconds"] / n,
                "kfac": one["setup_and_kfac_seconds"] / n,
                "iteration": one["seconds_per_iteration"] / n}
    rows = []
    for items in (100_000, 1_000_000):
        for gpus in (1, 8, 64):
            bandwidth = args.nvlink_gbs if gpus <= 8 else args.network_gbs
            share = items / gpus
            compute = share * (per_item["prefix"] + per_item["kfac"]
                               + args.iterations * per_item["iteration"]) / args.gpu_speedup
            reduce_s = args.iterations * ring_allreduce_seconds(
                one["bytes_per_iteration"], gpus, bandwidth * 1e9, args.latency_us * 1e-6)
            rows.append({"items": items, "gpus": gpus, "compute_seconds": compute,
                         "allreduce_seconds": reduce_s, "total_seconds": compute + reduce_s,
                         "memory_per_worker_gb": share * memory_per_item / 1e9})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iterations", type=int, default=10, help="PCG iterations (default)")
    parser.add_argument("--gpu-speedup", type=float, default=50.0,
                        help="ASSUMED speed of one GPU against this whole CPU")
    parser.add_argument("--nvlink-gbs", type=float, default=100.0,
                        help="ASSUMED all-reduce bandwidth within an 8-GPU node, GB/s")
    parser.add_argument("--network-gbs", type=float, default=12.5,
                        help="ASSUMED bandwidth between nodes (100 Gb/s), GB/s")
    parser.add_argument("--latency-us", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=Path("docs/results/scale.json"))
    args = parser.parse_args()

    images, labels = load_split("train")
    pick = few_shot_indices(labels, max(1, args.items // 10), seed=0)[: args.items]
    config = TrainConfig(max_iters=args.iterations, tol=1e-12)
    backbone = load_backbone(config.backbone)
    config = config.replace(image_size=input_size(config, backbone),
                            suffix_blocks=backbone.default_suffix_blocks,
                            weight_decay=config.ridge)
    x = to_tensor(images[pick], config.input_size, backbone.mean, backbone.std)
    y = torch.from_numpy(labels[pick])
    measured = []
    for world in args.ranks:
        log(f"{world} rank(s), {len(y)} items")
        measured.append(measure(world, x, y, config))
        log(json.dumps({k: v for k, v in measured[-1].items() if k != "delta"}))
    base = next(m for m in measured if m["ranks"] == 1)
    # The same model whatever the number of ranks (float32 sums in another order).
    base_delta = base["delta"]
    scale = float(base_delta.abs().max())
    for m in measured:
        m["max_abs_delta_difference"] = float((m.pop("delta") - base_delta).abs().max())
        m["delta_scale"] = scale
    for m in measured:
        m["iteration_speedup"] = base["seconds_per_iteration"] / m["seconds_per_iteration"]
        m["fit_speedup"] = base["fit_seconds"] / m["fit_seconds"]
    # Memory that grows with the items: one rank on half the items, against all of them.
    half = len(y) // 2
    log(f"1 rank, {half} items (memory per item)")
    smaller = measure(1, x[:half], y[:half], config)
    smaller.pop("delta")
    memory_per_item = (base["rss_growth_bytes"] - smaller["rss_growth_bytes"]) / (
        len(y) - half)
    fixed = base["rss_growth_bytes"] - memory_per_item * len(y)
    modelled = model(base, memory_per_item, args)
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
              "machine": machine_info(), "config": config.to_dict(),
              "assumptions": {"gpu_speedup": args.gpu_speedup, "nvlink_gbs": args.nvlink_gbs,
                              "network_gbs": args.network_gbs, "latency_us": args.latency_us,
                              "iterations": args.iterations},
              "measured": measured, "half_items_one_rank": smaller,
              "memory_per_item_bytes": memory_per_item, "memory_fixed_bytes": fixed,
              "modelled": modelled}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    lines = ["| ranks | items per rank | prefix s | setup+K-FAC s | s / iteration | "
             "MB all-reduced / iteration | fit s | iteration speedup | peak RSS GB | "
             "max abs dw difference to 1 rank |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in measured:
        lines.append(f"| {m['ranks']} | {m['items']} | {m['prefix_seconds']:.1f} | "
                     f"{m['setup_and_kfac_seconds']:.1f} | {m['seconds_per_iteration']:.2f} | "
                     f"{m['bytes_per_iteration'] / 1e6:.1f} | {m['fit_seconds']:.1f} | "
                     f"{m['iteration_speedup']:.2f}x | {m['peak_rss_bytes'] / 1e9:.2f} | "
                     f"{m['max_abs_delta_difference']:.1e} (of {m['delta_scale']:.1e}) |")
    lines += ["", f"Memory that grows with a rank's items: {memory_per_item / 1e6:.2f} MB per "
              f"item (plus {fixed / 1e9:.2f} GB fixed).", "",
              f"Modelled (assumed: a GPU {args.gpu_speedup:g}x this CPU, all-reduce at "
              f"{args.nvlink_gbs:g} GB/s within 8 GPUs and {args.network_gbs:g} GB/s "
              f"across nodes; not measured on a GPU):", "",
              "| items | GPUs | compute s | all-reduce s | total s | memory per worker GB |",
              "|---|---|---|---|---|---|"]
    for r in modelled:
        lines.append(f"| {r['items']:,} | {r['gpus']} | {r['compute_seconds']:.0f} | "
                     f"{r['allreduce_seconds']:.2f} | {r['total_seconds']:.0f} | "
                     f"{r['memory_per_worker_gb']:.1f} |")
    table = "\n".join(lines)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
