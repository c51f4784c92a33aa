"""Query benchmark: what the linear-quadratic model answers, measured.

    python -m bench.queries            # 100 shots -> docs/results/queries.{json,md}
    python -m bench.queries --quick    # 20 shots, small test sets -> queries-quick.*

ImageNet MobileNetV2 -> Fashion-MNIST at 64 px (--image-size), one seed, the library's
defaults otherwise:
  * mislabel detection: `shots` training images per class, 10 % of their labels flipped
    to another class (seeded). LQF (defaults, 20 % validation split) is trained on the
    noisy set; its training items are ranked by self-influence: cross-fitted (each item's
    residual under LQF refitted without its fifth of the items, the service's default)
    and the closed-form leave-one-out residual on K-FAC leverages; against ranking by
    training loss (the LQF model's own squared residual, and the
    fine-tuned network's cross-entropy) and, when kronfluence is installed, kronfluence's
    EK-FAC self-influence on the fine-tuned network over the same last blocks + head that
    LQF linearizes. Reported: precision of the top 10 % (the noise rate) and AUROC.
  * calibration and OOD: the same images with clean labels. Test: the first
    `--test-size` t10k images. LQF with uncertainty (probit over the posterior predictive,
    temperature fitted on the validation split), against fine-tuning (learning rate chosen
    on the validation split as in bench.transfer) with temperature scaling, and
    laplace-torch's last-layer Kronecker Laplace (GLM predictive, probit, prior precision
    by marginal likelihood) on that fine-tuned network. OOD: scikit-learn's digits as the
    outside set, AUROC of each model's score (LQF: its OOD score; the others: 1 - max
    probability).
  * cost: a model on all `shots` x 10 clean images (no validation split, so N = 1,000 at
    100 shots): influence query latency (K-FAC and CG), and exact unlearning of 1 and 10
    items (`lqf_core.unlearn.forget`, warm start + cached prefix outputs) as a fraction of
    the full training time, plus how far its result is from a fresh training run without
    those items.
Fine-tuning candidates come from bench.transfer.GRIDS; nothing is chosen on the test set.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from bench.fashion_mnist import CLASS_NAMES, few_shot_indices, load_split, to_tensor
from bench.transfer import BACKBONE, GRIDS, log, machine_info, run_method
from lqf_core.backbones import Backbone, load_backbone
from lqf_core.calibration import (
    accuracy,
    expected_calibration_error,
    negative_log_likelihood,
)
from lqf_core.classifier import build_classifier, trained_finetune_network
from lqf_core.config import TrainConfig
from lqf_core.crossfit import DEFAULT_FOLDS, cross_fit_model
from lqf_core.model import LOO_OUTPUTS, TrainedModel
from lqf_core.posterior import LQFPosterior
from lqf_core.train import train_model
from lqf_core.unlearn import forget

IMAGE_SIZE = 64
NUM_THREADS = 2
SECTIONS = ("mislabel", "calibration", "cost")
OPTIONAL_SECTIONS = ("mislabel_exact",)


# --- data -------------------------------------------------------------------------------

def flip_labels(labels: np.ndarray, fraction: float, num_classes: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, indices flipped): `fraction` of the items get another class."""
    rng = np.random.default_rng(seed + 1000)
    flipped = np.sort(rng.choice(len(labels), round(fraction * len(labels)), replace=False))
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, num_classes, len(flipped))) % num_classes
    return noisy, flipped


def digits_images(n: int) -> np.ndarray:
    """scikit-learn's 8x8 digits as uint8 28x28 grayscale, the OOD set."""
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images[:n]).float().div(16).unsqueeze(1)
    big = F.interpolate(raw, size=(28, 28), mode="bilinear", align_corners=False)
    return (big.squeeze(1).clamp(0, 1) * 255).round().byte().numpy()


# --- models ---------------------------------------------------------------------------

def lqf_config(seed: int, image_size: int, **overrides: Any) -> TrainConfig:
    return TrainConfig.from_dict({"method": "lqf", "backbone": BACKBONE, "seed": seed,
                                  "image_size": image_size, "device": "cpu", **overrides})


def train_lqf(x: torch.Tensor, y: list[int], seed: int, backbone: Backbone,
              cache: dict | None = None, **overrides: Any) -> TrainedModel:
    config = lqf_config(seed, x.shape[-1], **overrides)  # the size x was prepared at
    return train_model(x, y, CLASS_NAMES, config, backbone=backbone,
                       prefix_cache=cache)


def train_finetune(x: torch.Tensor, y: list[int], seed: int,
                   backbone: Backbone) -> tuple[TrainedModel, dict]:
    """Fine-tuning with its learning rate chosen on the validation split (bench.transfer)."""
    return run_method("finetune", GRIDS["finetune"], x, y, seed, x.shape[-1], backbone)


def posterior_of(model: TrainedModel, backbone: Backbone, cache: dict,
                 item_labels: dict[str, int], **options: Any) -> LQFPosterior:
    """In float32 by default: the service's precision for K-FAC answers at this size."""
    ids = model.info["train_item_ids"]
    z = torch.stack([cache[i] for i in ids])
    labels = torch.tensor([item_labels[i] for i in ids])
    return LQFPosterior(model, backbone, z, labels, **{"dtype": torch.float32, **options})


def prefix_features(model: TrainedModel, backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    prefix = backbone.split(model.config.suffix_blocks)[0].eval()
    with torch.no_grad():
        return torch.cat([prefix(x[i:i + 256]) for i in range(0, len(x), 256)])


def calibration(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    probs = probs.double()
    return {"accuracy": accuracy(probs, labels),
            "ece": expected_calibration_error(probs, labels),
            "nll": negative_log_likelihood(probs, labels)}


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """AUROC of telling the outside set from the inside one (higher score = outside)."""
    truth = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(truth, np.r_[in_scores.numpy(), out_scores.numpy()]))


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started


# --- mislabel detection ---------------------------------------------------------------

def detection(scores: torch.Tensor, is_flipped: np.ndarray, fraction: float) -> dict[str, float]:
    k = max(1, round(fraction * len(scores)))
    top = torch.argsort(scores, descending=True)[:k].numpy()
    return {"precision_at_noise_rate": float(is_flipped[top].mean()),
            "auroc": float(roc_auc_score(is_flipped, scores.numpy())), "k": k}


def kronfluence_self_influence(net: torch.nn.Sequential, x: torch.Tensor, y: torch.Tensor,
                               suffix_blocks: int) -> torch.Tensor:
    """EK-FAC self-influence (kronfluence) of each (x, y) on the fine-tuned network,
    tracking the convolutions and linear layers of the last `suffix_blocks` feature blocks
    and the head (the parameters LQF linearizes)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    first = len(net) - 2 - suffix_blocks  # net = blocks..., pool, head
    tracked = [name for name, m in net.named_modules()
               if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
               and int(name.split(".")[0]) >= first]

    class ClassificationTask(Task):
        def compute_train_loss(self, batch: Any, model: torch.nn.Module,
                               sample: bool = False) -> torch.Tensor:
            inputs, targets = batch
            logits = model(inputs)
            if sample:  # the true Fisher: labels drawn from the model
                with torch.no_grad():
                    targets = torch.multinomial(F.softmax(logits, -1), 1).flatten()
            return F.cross_entropy(logits, targets, reduction="sum")

        def compute_measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self) -> list[str]:
            return tracked

    task = ClassificationTask()
    model = prepare_model(net, task)
    dataset = torch.utils.data.TensorDataset(x, y)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("lqf_bench", model, task, cpu=True, disable_tqdm=True,
                            output_dir=tmp)
        analyzer.fit_all_factors("ekfac", dataset, per_device_batch_size=64,
                                 factor_args=FactorArguments(strategy="ekfac"))
        analyzer.compute_self_scores("self", "ekfac", dataset, per_device_train_batch_size=64)
        scores = analyzer.load_self_scores("self")["all_modules"]
    return scores.detach().float().flatten()


def mislabel_section(x: torch.Tensor, y_clean: np.ndarray, args: argparse.Namespace,
                     backbone: Backbone) -> dict[str, Any]:
    noisy, flipped = flip_labels(y_clean, args.noise, len(CLASS_NAMES), args.seed)
    ids = [str(i) for i in range(len(noisy))]
    cache: dict = {}
    lqf, lqf_s = timed(train_lqf, x, noisy.tolist(), args.seed, backbone, cache)
    log(f"noisy LQF trained in {lqf_s:.1f}s")
    post = posterior_of(lqf, backbone, cache, dict(zip(ids, noisy.tolist(), strict=True)))
    (scores, _), self_s = timed(post.self_influence, False)
    scored = [int(i) for i in lqf.info["train_item_ids"]]
    is_flipped = np.isin(scored, flipped)
    log(f"self-influence of {len(scored)} items (K-FAC leverages) in {self_s:.1f}s")
    train_ids = lqf.info["train_item_ids"]
    crossfit, crossfit_s = timed(cross_fit_model, lqf, x[scored], noisy[scored].tolist(),
                                 train_ids, backbone=backbone, prefix_cache=cache)
    log(f"cross-fitted self-influence ({DEFAULT_FOLDS} folds) in {crossfit_s:.1f}s")
    kappa = lqf.config.kappa
    targets = kappa * F.one_hot(torch.from_numpy(noisy[scored]), len(CLASS_NAMES)).to(
        crossfit.outputs)
    variants = held_out_scores("lqf_self_influence_crossfit", crossfit.outputs.double(),
                               targets.double(), kappa)
    methods = {
        **{name: detection(score.float(), is_flipped, args.noise)
           for name, score in variants.items()},
        "lqf_self_influence_leverage": detection(scores.float().cpu(), is_flipped, args.noise),
        "lqf_training_loss": detection((post.residuals**2).sum(1).float().cpu(), is_flipped,
                                       args.noise),
    }
    kron_note = None
    if args.finetune:  # the fine-tuned network's baselines: a learning-rate grid, minutes
        ft, _ = train_finetune(x, noisy.tolist(), args.seed, backbone)
        net = trained_finetune_network(ft, backbone)
        x_scored, y_scored = x[scored], torch.from_numpy(noisy[scored])
        with torch.no_grad():
            ce = F.cross_entropy(net(x_scored), y_scored, reduction="none")
        methods["finetune_training_loss"] = detection(ce, is_flipped, args.noise)
        if args.kronfluence:
            try:
                kron, kron_s = timed(kronfluence_self_influence, net, x_scored, y_scored,
                                     lqf.config.suffix_blocks)
                methods["kronfluence_self_influence"] = detection(kron, is_flipped,
                                                                  args.noise)
                log(f"kronfluence self-influence in {kron_s:.1f}s")
            except ImportError as exc:
                kron_note = f"kronfluence not installed: {exc}"
    return {"num_scored": len(scored), "num_flipped_scored": int(is_flipped.sum()),
            "noise": args.noise, "lqf_train_seconds": lqf_s,
            "self_influence_seconds": self_s, "leverages": "kfac",
            "crossfit_seconds": crossfit_s, "crossfit_folds": DEFAULT_FOLDS,
            "methods": methods, "kronfluence_note": kron_note}


def mislabel_exact_section(x: torch.Tensor, y_clean: np.ndarray, args: argparse.Namespace,
                           backbone: Backbone) -> dict[str, Any]:
    """The same noisy labels, a model of the exact solver (docs/method.md): it trains on
    every item and stores each one's exact leave-one-out output, so its mislabel score
    ||Y_i - f_-i(x_i)||^2 / kappa^2 costs nothing beyond the training."""
    noisy, flipped = flip_labels(y_clean, args.noise, len(CLASS_NAMES), args.seed)
    model, train_s = timed(train_lqf, x, noisy.tolist(), args.seed, backbone, {},
                           solver="exact")
    log(f"noisy exact-solver LQF trained in {train_s:.1f}s")
    scored = [int(i) for i in model.info["train_item_ids"]]
    loo = model.tensors[LOO_OUTPUTS].double()
    kappa = model.config.kappa
    targets = kappa * F.one_hot(torch.from_numpy(noisy[scored]), len(CLASS_NAMES)).to(loo)
    is_flipped = np.isin(scored, flipped)
    methods = {name: detection(score.float(), is_flipped, args.noise)
               for name, score in held_out_scores("lqf_exact_loo", loo, targets,
                                                  kappa).items()}
    return {"num_scored": len(scored), "num_flipped_scored": int(is_flipped.sum()),
            "noise": args.noise, "train_seconds": train_s,
            "weight_decay": model.config.ridge, "loo_accuracy": model.metrics["loo_accuracy"],
            "relative_grad_norm": model.info.get("relative_grad_norm"), "methods": methods}


def held_out_scores(name: str, outputs: torch.Tensor, targets: torch.Tensor, kappa: float
                    ) -> dict[str, torch.Tensor]:
    """Mislabel scores from each item's output under a model trained without it:
    the squared residual (the service's score), how far the labelled class falls short of
    kappa, and the margin by which another class beats it."""
    label = targets.argmax(1)
    own = outputs.gather(1, label[:, None])[:, 0]
    others = outputs.masked_fill(F.one_hot(label, outputs.shape[1]).bool(), -torch.inf)
    return {name: ((targets - outputs) ** 2).sum(1) / kappa**2,
            f"{name}_label_deficit": (kappa - own) / kappa,
            f"{name}_margin": (others.max(1).values - own) / kappa}


# --- calibration and OOD --------------------------------------------------------------

def laplace_probs(net: torch.nn.Sequential, x_fit: torch.Tensor, y_fit: torch.Tensor,
                  inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    from laplace import Laplace

    la = Laplace(net, "classification", subset_of_weights="last_layer",
                 hessian_structure="kron")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_fit, y_fit),
                                         batch_size=64)
    la.fit(loader)
    # One prior precision, fitted by marginal likelihood, as in the library's examples.
    la.optimize_prior_precision(pred_type="glm", method="marglik", link_approx="probit",
                                prior_structure="scalar")
    out = []
    for x in inputs:
        with torch.no_grad():
            out.append(torch.cat([la(x[i:i + 256], pred_type="glm", link_approx="probit")
                                  for i in range(0, len(x), 256)]))
    return out


def calibration_section(x: torch.Tensor, y: np.ndarray, x_test: torch.Tensor,
                        y_test: torch.Tensor, x_ood: torch.Tensor, args: argparse.Namespace,
                        backbone: Backbone) -> dict[str, Any]:
    ids = [str(i) for i in range(len(y))]
    cache: dict = {}
    lqf = train_lqf(x, y.tolist(), args.seed, backbone, cache)
    post = posterior_of(lqf, backbone, cache, dict(zip(ids, y.tolist(), strict=True)))
    results: dict[str, Any] = {}
    logits = build_classifier(lqf, backbone, torch.device("cpu")).logits(x_test)
    results["lqf_temperature"] = calibration(F.softmax(logits.double() / lqf.temperature, 1),
                                             y_test)
    z_test = prefix_features(lqf, backbone, x_test)
    z_ood = prefix_features(lqf, backbone, x_ood)
    u_test, u_s = timed(post.uncertainty, z_test, False)
    u_ood = post.uncertainty(z_ood, exact=False)
    log(f"LQF uncertainty of {len(z_test)} test images (K-FAC) in {u_s:.1f}s")
    results["lqf_uncertainty"] = {
        **calibration(u_test.probabilities.cpu(), y_test),
        "ood_auroc": auroc(u_test.ood_score.cpu(), u_ood.ood_score.cpu()),
        "ood_auroc_variance_ratio": auroc(u_test.variance_ratio.cpu(),
                                          u_ood.variance_ratio.cpu()),
        "ood_auroc_max_probability": auroc(1 - u_test.probabilities.max(1).values.cpu(),
                                           1 - u_ood.probabilities.max(1).values.cpu()),
        "seconds_per_image": u_s / len(z_test),
    }
    ft, ft_record = train_finetune(x, y.tolist(), args.seed, backbone)
    net = trained_finetune_network(ft, backbone)
    with torch.no_grad():
        ft_test = F.softmax(net(x_test).double() / ft.temperature, 1)
        ft_ood = F.softmax(net(x_ood).double() / ft.temperature, 1)
    results["finetune_temperature"] = {
        **calibration(ft_test, y_test),
        "ood_auroc": auroc(1 - ft_test.max(1).values, 1 - ft_ood.max(1).values),
        "lr": ft.config.lr,
    }
    fit_ids = [int(i) for i in ft.info["train_item_ids"]]
    try:
        (la_test, la_ood), la_s = timed(laplace_probs, net, x[fit_ids],
                                        torch.from_numpy(y[fit_ids]), [x_test, x_ood])
        results["laplace_last_layer_kron"] = {
            **calibration(la_test, y_test),
            "ood_auroc": auroc(1 - la_test.max(1).values, 1 - la_ood.max(1).values),
            "seconds": la_s,
        }
    except ImportError as exc:
        results["laplace_last_layer_kron"] = {"note": f"laplace-torch not installed: {exc}"}
    return {"models": results, "finetune_selection": ft_record["candidates"]}


# --- cost -------------------------------------------------------------------------------

def cost_section(x: torch.Tensor, y: np.ndarray, x_test: torch.Tensor,
                 args: argparse.Namespace, backbone: Backbone) -> dict[str, Any]:
    ids = [str(i) for i in range(len(y))]
    labels = y.tolist()
    cache: dict = {}
    parent, full_s = timed(train_lqf, x, labels, args.seed, backbone, cache, val_fraction=0.0)
    log(f"full LQF training on {len(ids)} items: {full_s:.1f}s")
    # float32 with a CG tolerance float32 reaches (the float64 default is 1e-5).
    post, build_s = timed(posterior_of, parent, backbone, cache,
                          dict(zip(ids, labels, strict=True)), tol=1e-4, max_iters=100)
    z_query = prefix_features(parent, backbone, x_test[:5])
    latency: dict[str, Any] = {"num_train": post.n, "posterior_build_seconds": build_s,
                               "dtype": "float32", "cg_tol": post.tol,
                               "cg_max_iters": post.max_iters}
    _, factors_s = timed(post.inverse_hessian, False)
    latency["kfac_factors_once_seconds"] = factors_s
    times = [timed(post.influence, z_query[i:i + 1], None, False, False)[1] for i in range(3)]
    latency["first_order_kfac_seconds"] = float(np.median(times))
    _, latency["first_order_cg_seconds"] = timed(post.influence, z_query[:1], None, True, False)
    _, lev_s = timed(post.loo_residuals, False)
    latency["kfac_leverages_once_seconds"] = lev_s
    # the exact leave-one-out variant on the K-FAC leverages (computed once above)
    _, loo_s = timed(post.influence, z_query[3:4], None, False, True)
    latency["exact_loo_kfac_seconds_after_leverages"] = loo_s
    log(f"influence latency: {latency}")

    rng = np.random.default_rng(args.seed)
    classifier = build_classifier(parent, backbone, torch.device("cpu"))
    unlearning = []
    for count in (1, 10):
        gone = {str(i) for i in rng.choice(len(ids), count, replace=False)}
        keep = [i for i, item in enumerate(ids) if item not in gone]
        keep_ids, keep_labels = [ids[i] for i in keep], [labels[i] for i in keep]
        child, forget_s = timed(forget, parent, x[keep], keep_labels, keep_ids, sorted(gone),
                                backbone=backbone, prefix_cache=dict(cache))
        fresh, fresh_s = timed(train_model, x[keep], keep_labels, CLASS_NAMES, parent.config,
                               backbone=backbone, item_ids=keep_ids)
        out = {name: build_classifier(m, backbone, torch.device("cpu")).logits(x_test)
               for name, m in (("forget", child), ("fresh", fresh))}
        scale = float(out["fresh"].abs().max())
        unlearning.append({
            "items": count, "forget_seconds": forget_s, "fresh_seconds": fresh_s,
            "fraction_of_full_training": forget_s / full_s,
            "forget_solver_iterations": child.info.get("solver_iterations"),
            "fresh_solver_iterations": fresh.info.get("solver_iterations"),
            "max_abs_output_difference": float((out["forget"] - out["fresh"]).abs().max()),
            "output_scale": scale,
            "prediction_agreement": float(
                (out["forget"].argmax(1) == out["fresh"].argmax(1)).float().mean()),
            "changed_vs_parent": float(
                (out["forget"].argmax(1) != classifier.logits(x_test).argmax(1)).float().mean()),
        })
        log(f"forget {count}: {forget_s:.1f}s vs full {full_s:.1f}s")
    return {"full_training_seconds": full_s,
            "parent_solver_iterations": parent.info.get("solver_iterations"),
            "influence": latency, "unlearning": unlearning}


# --- report -------------------------------------------------------------------------------

def _machine(info: dict[str, str]) -> str:
    return f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}"


def markdown(result: dict[str, Any]) -> str:
    mis, cal, cost = result["mislabel"], result["calibration"], result["cost"]
    lines = [
        "# Query benchmark", "", "Runs:", "",
        *[f"- {name}: `{result[name]['run']['command']}` ({result[name]['run']['date']}, "
          f"{_machine(result[name]['run'].get('machine', result['machine']))})"
          for name in SECTIONS], "",
        f"## Mislabel detection ({mis['num_scored']} scored training items, "
        f"{mis['num_flipped_scored']} flipped; top {mis['noise']:.0%})", "",
        f"LQF training: {mis['lqf_train_seconds']:.1f} s; cross-fitted self-influence "
        f"({mis['crossfit_folds']} folds): {mis['crossfit_seconds']:.1f} s; leverage "
        f"self-influence (K-FAC): {mis['self_influence_seconds']:.1f} s.", "",
        "| ranking | precision of the top 10 % | AUROC |", "|---|---|---|",
    ]
    for name, m in mis["methods"].items():
        lines.append(f"| {name} | {m['precision_at_noise_rate']:.3f} | {m['auroc']:.3f} |")
    if mis.get("kronfluence_note"):
        lines += ["", mis["kronfluence_note"]]
    exact = result.get("mislabel_exact")
    if exact:
        m = exact["methods"]["lqf_exact_loo"]
        lines += ["", f"Exact solver (`--sections mislabel_exact`, {exact['run']['date']}): "
                  f"all {exact['num_scored']} items trained on and scored "
                  f"({exact['num_flipped_scored']} flipped), weight decay "
                  f"{exact['weight_decay']:g}, training {exact['train_seconds']:.1f} s, "
                  f"leave-one-out accuracy {exact['loo_accuracy']:.3f}.", "",
                  "| ranking | precision of the top 10 % | AUROC |", "|---|---|---|",
                  f"| lqf_exact_loo | {m['precision_at_noise_rate']:.3f} | {m['auroc']:.3f} |"]
    lines += ["", f"## Calibration on {result['sizes']['test']} test images, OOD vs "
              f"{result['sizes']['ood']} digits ({result['sizes'].get('image_size', 64)} px)",
              "",
              "| model | accuracy | ECE | NLL | OOD AUROC |", "|---|---|---|---|---|"]
    for name, m in cal["models"].items():
        if "note" in m:
            lines.append(f"| {name} | {m['note']} | | | |")
            continue
        ood = f"{m['ood_auroc']:.3f}" if "ood_auroc" in m else ""
        lines.append(f"| {name} | {m['accuracy']:.3f} | {m['ece']:.4f} | {m['nll']:.3f} | "
                     f"{ood} |")
    lqf = cal["models"].get("lqf_uncertainty", {})
    if "ood_auroc_variance_ratio" in lqf:
        lines += ["", "LQF's OOD AUROC by each score: ood_score (the entropy) "
                  f"{lqf['ood_auroc']:.3f}, variance_ratio {lqf['ood_auroc_variance_ratio']:.3f},"
                  f" 1 - max probability {lqf['ood_auroc_max_probability']:.3f}."]
    inf = cost["influence"]
    lines += ["", f"## Cost (N = {inf['num_train']} training items)", "",
              f"- full LQF training: {cost['full_training_seconds']:.1f} s "
              f"({cost['parent_solver_iterations']} solver iterations)",
              f"- posterior build (once per model, {inf['dtype']}): "
              f"{inf['posterior_build_seconds']:.1f} s; K-FAC factors (once): "
              f"{inf['kfac_factors_once_seconds']:.1f} s",
              f"- influence query, first order, K-FAC: {inf['first_order_kfac_seconds']:.3f} s;"
              f" PCG (to relative residual {inf['cg_tol']:g} or {inf['cg_max_iters']} iterations): "
              f"{inf['first_order_cg_seconds']:.1f} s",
              f"- K-FAC leverages (once per model): {inf['kfac_leverages_once_seconds']:.1f} s;"
              f" exact-LOO query after them: {inf['exact_loo_kfac_seconds_after_leverages']:.3f}"
              " s", "",
              "| forgotten items | forget (s) | fraction of full training | fresh run (s) | "
              "iterations forget / fresh | max abs output diff vs fresh (output scale) | "
              "prediction agreement |", "|---|---|---|---|---|---|---|"]
    for u in cost["unlearning"]:
        lines.append(
            f"| {u['items']} | {u['forget_seconds']:.1f} | {u['fraction_of_full_training']:.2f} "
            f"| {u['fresh_seconds']:.1f} | {u['forget_solver_iterations']} / "
            f"{u['fresh_solver_iterations']} | {u['max_abs_output_difference']:.2e} "
            f"({u['output_scale']:.1f}) | {u['prediction_agreement']:.4f} |")
    lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.queries", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="20 shots, 300 test and 200 OOD images")
    parser.add_argument("--shots", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=0.1, help="fraction of labels flipped")
    parser.add_argument("--test-size", type=int)
    parser.add_argument("--ood-size", type=int)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                        help="input size of every model (default 64 px, the protocol of the "
                             "committed results; a default job on these 28 px images gets "
                             "96 px, lqf_core.backbones.InputSizes)"),
    parser.add_argument("--no-kronfluence", dest="kronfluence", action="store_false")
    parser.add_argument("--no-finetune", dest="finetune", action="store_false",
                        help="mislabel: LQF's rankings only (no fine-tuning, no kronfluence)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS),
                        choices=SECTIONS + OPTIONAL_SECTIONS,
                        help="run these only, adding them to the results already in --out")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    defaults = (20, 300, 200, "queries-quick") if args.quick else (100, 2000, 1000, "queries")
    args.shots = args.shots or defaults[0]
    args.test_size = args.test_size or defaults[1]
    args.ood_size = args.ood_size or defaults[2]
    args.out = args.out or Path("docs/results") / f"{defaults[3]}.json"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(NUM_THREADS)
    backbone = load_backbone(BACKBONE)
    x_pool, y_pool = load_split("train")
    x_t10k, y_t10k = load_split("t10k")
    idx = few_shot_indices(y_pool, args.shots, args.seed)
    size = args.image_size
    x = to_tensor(x_pool[idx], size, backbone.mean, backbone.std)
    y = y_pool[idx]
    x_test = to_tensor(x_t10k[: args.test_size], size, backbone.mean, backbone.std)
    y_test = torch.from_numpy(y_t10k[: args.test_size])
    x_ood = to_tensor(digits_images(args.ood_size), size, backbone.mean, backbone.std)
    run = {"command": "python -m bench.queries " + shlex.join(sys.argv[1:] if argv is None
                                                              else argv),
           "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": machine_info()}
    # A run of some sections adds them to the results already in --out, so each section
    # keeps its own run (command, date, machine).
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result: dict[str, Any] = {
        **{k: previous[k] for k in SECTIONS + OPTIONAL_SECTIONS if k in previous},
        "machine": machine_info(),  # of the latest run; each section's run has its own
        "sizes": {"shots": args.shots, "train": len(y), "test": len(y_test),
                  "ood": len(x_ood), "image_size": size},
        "seed": args.seed,
    }
    sections = {
        "mislabel": lambda: mislabel_section(x, y, args, backbone),
        "calibration": lambda: calibration_section(x, y, x_test, y_test, x_ood, args,
                                                   backbone),
        "cost": lambda: cost_section(x, y, x_test, args, backbone),
        "mislabel_exact": lambda: mislabel_exact_section(x, y, args, backbone),
    }
    for name in args.sections:
        result[name] = {**sections[name](), "run": run}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if set(SECTIONS) <= result.keys():
        text = markdown(result)
        args.out.with_suffix(".md").write_text(text)
        print(text)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
