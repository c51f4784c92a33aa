"""Issue 13, item 4: how long the final LQF fit at 100 shots takes, side by side in one run.

    python -m bench.fit_time                      # -> docs/results/fit-time.{json,md}
    python -m bench.fit_time --seeds 0 --no-finetune   # a quicker look

"Today's" fit is the code as it was when the exact-optimum issue was filed (commit
`--baseline-commit`, checked out into a temporary git worktree), so the comparison is
against what a user then waited for, not against today's code with the old settings
(that row is here too: the early stop on today's faster products).

Each variant runs in its own process on the same 1,000 images (100 per class of the
Fashion-MNIST training pool, `few_shot_indices`), round-robin per seed, 2 threads, and
the time is that of `train_model` alone (backbone and data are loaded before the clock
starts). Variants:
  issue-time      the transfer protocol's final LQF fit in the baseline commit's code
                  (4 blocks, probe_l2 10, weight decay 1e-3, 10 PCG iterations, 64 px)
  early-stop-now  the same settings in today's code
  converged-now   the protocol's final fit today (the default objective, 64 px)
  job-now         a default job today ({"method": "lqf"}: its input size, its calibration)
  job-issue-time  a default job in the baseline commit's code
  finetune        the protocol's fine-tuning at 100 shots: its final model is the selected
                  candidate (whole network, 30 epochs, patience 5 on a 20 % validation
                  split), here with the learning rate the committed transfer run selected
                  for the seed (docs/results/transfer.json), since early stopping makes
                  its time depend on it
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BASELINE_COMMIT = "170f0b9"  # the last commit before issue 13's first change
SHOTS = 100
THREADS = 2
INPUT_SIZES = (64, 96, 128)  # 64: the protocol's and the baseline's; 96: a job's for 28 px

_PROTOCOL_FINAL = {"method": "lqf", "suffix_blocks": 4, "probe_l2": 10.0,
                   "weight_decay": 1e-3, "val_fraction": 0.0, "image_size": 64}
# variant -> (code tree: "baseline" or "now", settings on top of backbone/seed/device)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "issue-time": ("baseline", {**_PROTOCOL_FINAL, "max_iters": 10}),
    "early-stop-now": ("now", {**_PROTOCOL_FINAL, "max_iters": 10,
                               "regularizer": "isotropic"}),
    "converged-now": ("now", _PROTOCOL_FINAL),
    "job-now": ("now", {"method": "lqf"}),
    "job-issue-time": ("baseline", {"method": "lqf"}),
    "finetune": ("now", {"method": "finetune", "train_blocks": 0, "epochs": 30,
                         "patience": 5, "val_fraction": 0.2, "image_size": 64}),
}
TRANSFER_RESULTS = ROOT / "docs/results/transfer.json"
FINETUNE_LR = 1e-4  # for a seed the committed transfer run does not have


def finetune_lr(seed: int) -> float:
    """The learning rate the committed transfer protocol selected at 100 shots."""
    if TRANSFER_RESULTS.exists():
        data = json.loads(TRANSFER_RESULTS.read_text())  # a list of records
        for record in data:
            if (record.get("method"), record.get("shots"), record.get("seed")) == (
                    "finetune", SHOTS, seed):
                return float(record["settings"]["lr"])
    return FINETUNE_LR


# --- The child: one fit in whichever tree PYTHONPATH names ------------------------------

def child(spec_path: Path) -> None:
    """Train once and print a JSON line; imports only lqf_core (old and new trees alike)."""
    import torch

    import lqf_core
    from lqf_core.backbones import load_backbone
    from lqf_core.config import TrainConfig
    from lqf_core.train import train_model

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(THREADS)
    backbone = load_backbone("mobilenet_v2")
    settings = {**spec["settings"], "backbone": "mobilenet_v2", "seed": spec["seed"],
                "device": "cpu"}
    config = TrainConfig.from_dict(settings)
    size = config.image_size
    if size is None:  # today's rule for these 28 px images
        size = backbone.auto_image_size([28])
    data = torch.load(spec["data"])
    if size not in data["inputs"]:
        raise SystemExit(f"no inputs at {size} px (the parent wrote {sorted(data['inputs'])})")
    x = data["inputs"][size]
    started = time.monotonic()
    model = train_model(x, data["labels"], data["class_names"], config, backbone=backbone)
    seconds = time.monotonic() - started
    info = {k: model.info.get(k) for k in ("solver_iterations", "relative_grad_norm",
                                           "solver_converged", "num_train")}
    print(json.dumps({"seconds": seconds, "train_seconds": model.metrics.get("train_seconds"),
                      "image_size": size, "lqf_core": str(Path(lqf_core.__file__).parent),
                      "info": info}))


# --- The parent ---------------------------------------------------------------------------

def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_variant(name: str, tree: Path, data: Path, seed: int, workdir: Path) -> dict[str, Any]:
    spec = workdir / f"{name}-{seed}.json"
    settings = dict(VARIANTS[name][1])
    if name == "finetune":
        settings["lr"] = finetune_lr(seed)
    spec.write_text(json.dumps({"settings": settings, "seed": seed,
                                "data": str(data)}))
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(THREADS)}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec)],
                          env=env, cwd=tree, capture_output=True, text=True, timeout=3600,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed:\n{done.stderr[-3000:]}")
    result = {"settings": settings, **json.loads(done.stdout.strip().splitlines()[-1])}
    if Path(result["lqf_core"]).resolve() != (tree / "lqf_core").resolve():
        raise RuntimeError(f"{name} imported {result['lqf_core']}, not {tree}")
    return result


def baseline_tree(commit: str, parent: Path) -> Path:
    tree = parent / f"lqf-{commit}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit],
                   check=True, capture_output=True)
    return tree


def markdown(records: list[dict], meta: dict) -> str:
    names = [n for n in VARIANTS if any(r["variant"] == n for r in records)]
    seeds = sorted({r["seed"] for r in records})

    def secs(name: str, seed: int) -> float | None:
        found = [r["seconds"] for r in records if r["variant"] == name and r["seed"] == seed]
        return found[0] if found else None

    lines = [f"# Final-fit time at {SHOTS} shots (`python -m bench.fit_time`)", "",
             f"{meta['date']}, {meta['machine']['cpu']} ({meta['machine']['cores']} cores, "
             f"{THREADS} threads), git {meta['git']}, baseline "
             f"{meta['baseline_commit']}. Command: `{meta['command']}`", "",
             "| variant | " + " | ".join(f"seed {s} (s)" for s in seeds)
             + " | iterations | size | ratio to issue-time | ratio to finetune |",
             "|---|" + "---|" * (len(seeds) + 4)]
    for name in names:
        cells, to_old, to_ft = [], [], []
        for s in seeds:
            t = secs(name, s)
            cells.append("—" if t is None else f"{t:.1f}")
            old, ft = secs("issue-time", s), secs("finetune", s)
            if t is not None and old:
                to_old.append(t / old)
            if t is not None and ft:
                to_ft.append(t / ft)
        rows = [r for r in records if r["variant"] == name]
        iters = sorted({str(r["info"].get("solver_iterations")) for r in rows})
        size = rows[0]["image_size"]

        def span(v: list[float]) -> str:
            return "—" if not v else f"{min(v):.2f}–{max(v):.2f}"
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {'/'.join(iters)} | {size} | {span(to_old)} | {span(to_ft)} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--no-finetune", action="store_true")
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/fit-time.json")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return

    import torch

    from bench.fashion_mnist import CLASS_NAMES, few_shot_indices, load_split, to_tensor
    from bench.transfer import machine_info
    from lqf_core.backbones import load_backbone

    variants = [v for v in args.variants if not (args.no_finetune and v == "finetune")]
    command = " ".join(["python -m bench.fit_time", *(sys.argv[1:] if argv is None else argv)])
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=True).stdout.strip()
    x_pool, y_pool = load_split("train")
    backbone = load_backbone("mobilenet_v2")
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        trees = {"now": ROOT}
        if any(VARIANTS[v][0] == "baseline" for v in variants):
            trees["baseline"] = baseline_tree(args.baseline_commit, workdir)
        try:
            for seed in args.seeds:
                idx = few_shot_indices(y_pool, SHOTS, seed)
                data = workdir / f"data-{seed}.pt"
                # Every input size a variant may use, made once by this tree's code, so
                # both trees fit the same tensors.
                inputs = {size: to_tensor(x_pool[idx], size, backbone.mean, backbone.std)
                          for size in INPUT_SIZES}
                torch.save({"inputs": inputs, "labels": y_pool[idx].tolist(),
                            "class_names": CLASS_NAMES}, data)
                for name in variants:
                    result = run_variant(name, trees[VARIANTS[name][0]], data, seed, workdir)
                    records.append({"variant": name, "seed": seed, **result})
                    log(f"{name} seed {seed}: {result['seconds']:.1f}s "
                        f"({result['info'].get('solver_iterations')} iterations)")
        finally:
            if "baseline" in trees:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(trees["baseline"])], check=False, capture_output=True)
    meta = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "git": git,
            "baseline_commit": args.baseline_commit, "command": command,
            "machine": machine_info(),
            "median_seconds": {n: statistics.median(r["seconds"] for r in records
                                                    if r["variant"] == n) for n in variants}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    text = markdown(records, meta)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
