"""The two forms a layer's recorded signals can take, side by side (lqf_core/signals.py).

    python -m bench.signal_forms            # -> docs/results/signal-forms.{json,md}
    python -m bench.signal_forms --no-jobs  # the products only (about a minute)

On the 100-shot Fashion-MNIST draw (1,000 items, MobileNetV2's 4-block suffix at 96 px,
the size a default job picks for 28 px images), records the layer signals twice: with
each layer's smaller form (`signals.prefers_rows`: the depthwise layers keep their
explicit Jacobian rows, the others their inputs and output gradients), and with every
layer forced into inputs and output gradients (the form before session 19). For each it
reports the recording time, the memory, and the fastest of 3 `H v` products, and how far
the products of the two forms differ. With jobs (the default), it then trains a default
job in each form, alternating A B A B. It reports job time, iterations and dev accuracy
on 2,000 training-pool images outside every seed's draw (never the test set), and the
largest difference between the two forms' dev outputs.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.fashion_mnist import dev_indices, few_shot_indices, load_split, to_tensor
from bench.transfer import machine_info
from lqf_core import signals
from lqf_core.backbones import load_backbone
from lqf_core.classifier import build_classifier
from lqf_core.config import TrainConfig
from lqf_core.lqf import build_lqf_problem
from lqf_core.train import train_model

SIZE = 96
CLASS_NAMES = [str(c) for c in range(10)]
FORMS = ("smaller form per layer", "inputs and output gradients everywhere")


@contextmanager
def signal_form(form: str) -> Iterator[None]:
    """Within the block, layers record in `form`."""
    chosen: Callable[..., bool] = signals.prefers_rows
    if form == FORMS[1]:
        signals.prefers_rows = lambda *_: False  # type: ignore[assignment]
    try:
        yield
    finally:
        signals.prefers_rows = chosen  # type: ignore[assignment]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def products(z: torch.Tensor, y: torch.Tensor, backbone: Any) -> dict[str, Any]:
    config = TrainConfig(seed=0, device="cpu", image_size=SIZE).replace(
        suffix_blocks=backbone.default_suffix_blocks)
    out: dict[str, Any] = {}
    results = {}
    for form in FORMS:
        with signal_form(form):
            started = time.perf_counter()
            setup = build_lqf_problem(backbone, z, y, len(CLASS_NAMES), config,
                                      torch.device("cpu"), signals=True)
            record_s = time.perf_counter() - started
        recorded = setup.problem.products
        assert recorded is not None
        generator = torch.Generator().manual_seed(0)
        v = torch.randn(setup.lin.num_params, generator=generator)
        u = torch.randn(z.shape[0], len(CLASS_NAMES), generator=generator)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            hv = setup.problem.hessian_matvec(v)
            times.append(time.perf_counter() - started)
        results[form] = (recorded.forward(v), recorded.transpose(u), hv)
        out[form] = {"record_s": record_s, "hessian_matvec_s": min(times),
                     "signals_gb": recorded.numel() * z.element_size() / 1e9,
                     "rows_layers": recorded.row_layers()}
        print(f"{form}: record {record_s:.1f} s, H v {min(times):.3f} s, "
              f"{out[form]['signals_gb']:.2f} GB", flush=True)
        del setup, recorded
    mine, before = results[FORMS[0]], results[FORMS[1]]
    out["relative_difference"] = {name: relative(a, b) for name, a, b in
                                  zip(("J v", "J^T u", "H v"), mine, before, strict=True)}
    return out


def jobs(images: torch.Tensor, labels: list[int], x_dev: torch.Tensor, y_dev: torch.Tensor,
         backbone: Any) -> dict[str, Any]:
    runs, logits = [], {}
    for form in (*FORMS, *FORMS):
        with signal_form(form):
            started = time.perf_counter()
            model = train_model(images, labels, CLASS_NAMES,
                                TrainConfig(seed=0, device="cpu", image_size=None),
                                backbone=backbone)
            seconds = time.perf_counter() - started
        out = build_classifier(model, backbone, torch.device("cpu")).logits(x_dev)
        logits[form] = out
        runs.append({"form": form, "job_s": seconds,
                     "iterations": model.info["solver_iterations"],
                     "relative_grad_norm": model.info["relative_grad_norm"],
                     "dev_accuracy": float((out.argmax(1) == y_dev).double().mean())})
        print(json.dumps(runs[-1]), flush=True)
    a, b = logits[FORMS[0]], logits[FORMS[1]]
    return {"runs": runs,
            "max_dev_output_difference_over_scale": float((a - b).abs().max() / b.abs().max()),
            "dev_prediction_agreement": float((a.argmax(1) == b.argmax(1)).double().mean())}


def markdown(result: dict[str, Any]) -> str:
    p = result["products"]
    lines = [f"# Signal forms: `{result['command']}`", "",
             f"{result['date']}, {result['machine']['cpu']}, {result['machine']['cores']} "
             f"cores; {result['items']} items, {SIZE} px.", "",
             "| form | recording s | H v s (min of 3) | signals GB | layers kept as rows |",
             "|---|---|---|---|---|"]
    for form in FORMS:
        r = p[form]
        lines.append(f"| {form} | {r['record_s']:.1f} | {r['hessian_matvec_s']:.3f} | "
                     f"{r['signals_gb']:.2f} | {len(r['rows_layers'])} |")
    diff = p["relative_difference"]
    lines += ["", "Relative difference of the products: " + ", ".join(
        f"{k} {v:.1e}" for k, v in diff.items()), ""]
    if "jobs" in result:
        lines += ["| form | job s | iterations | dev accuracy |", "|---|---|---|---|"]
        for run in result["jobs"]["runs"]:
            lines.append(f"| {run['form']} | {run['job_s']:.1f} | {run['iterations']} | "
                         f"{run['dev_accuracy']:.4f} |")
        j = result["jobs"]
        lines += ["", f"Dev outputs: max difference {j['max_dev_output_difference_over_scale']:.1e}"
                      f" of the output scale, predictions agree on "
                      f"{j['dev_prediction_agreement']:.4f}.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.signal_forms", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-jobs", dest="jobs", action="store_false")
    parser.add_argument("--out", type=Path, default=Path("docs/results/signal-forms.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    backbone = load_backbone("mobilenet_v2")
    x_pool, y_pool = load_split("train")
    idx = few_shot_indices(y_pool, 100, 0)
    images = to_tensor(x_pool[idx], SIZE, backbone.mean, backbone.std)
    labels = y_pool[idx].tolist()
    prefix = backbone.split(TrainConfig(suffix_blocks=backbone.default_suffix_blocks).suffix)[0]
    with torch.no_grad():
        z = torch.cat([prefix.eval()(images[i:i + 128]) for i in range(0, len(images), 128)])
    result: dict[str, Any] = {
        "command": "python -m bench.signal_forms" + ("" if args.jobs else " --no-jobs"),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_info(),
        "items": len(labels),
        "products": products(z, torch.tensor(labels), backbone)}
    if args.jobs:
        dev = dev_indices(y_pool, 100, [0, 1, 2], 2000)
        x_dev = to_tensor(x_pool[dev], SIZE, backbone.mean, backbone.std)
        result["jobs"] = jobs(images, labels, x_dev, torch.from_numpy(y_pool[dev]), backbone)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
