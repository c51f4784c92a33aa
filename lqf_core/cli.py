"""`lqf train DIR --out MODEL` and `lqf predict MODEL IMAGE... [--json]`.

Bad input (empty folder, one class, unreadable image, unknown backbone...) prints one
line to stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lqf_core.config import Method, TrainConfig
from lqf_core.errors import LQFError

EXIT_BAD_INPUT = 2


def weights_dirs(weights_dir: str | None) -> list[Path]:
    """--weights-dir, then torchvision's cache ($TORCH_HOME/hub/checkpoints). The command
    line is the one place in lqf_core that reads the environment: the library takes the
    directories as arguments."""
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    return [*([Path(weights_dir)] if weights_dir else []), torch_home / "hub" / "checkpoints"]


def _train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lqf_core.artifacts import save_model
    from lqf_core.data import open_image, scan_image_folder
    from lqf_core.train import Progress, train_model

    values = {"method": args.method, "backbone": args.backbone, "seed": args.seed}
    for name in ("image_size", "val_fraction", "suffix_blocks", "weight_decay", "probe_l2",
                 "kappa", "max_iters", "tol", "epochs", "lr", "leaky_slope", "device",
                 "solver", "calibration"):
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    config = TrainConfig.from_dict(values)
    paths, labels, class_names = scan_image_folder(args.directory)
    images = [open_image(p) for p in paths]  # fail fast on an unreadable image
    bars: dict[str, tqdm] = {}

    def show(p: Progress) -> None:
        bar = bars.get(p.stage)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[p.stage] = tqdm(total=p.total, desc=p.stage, file=sys.stderr, leave=False)
        bar.n = min(p.step, p.total)
        bar.set_postfix({k: f"{v:.3g}" for k, v in p.metrics.items()}, refresh=True)

    model = train_model(images, labels, class_names, config, progress=show,
                        weights_dir=weights_dirs(args.weights_dir))
    for bar in bars.values():
        bar.close()
    save_model(model, args.out)
    print(f"trained {config.method.value} on {len(images)} images, {len(class_names)} classes "
          f"({', '.join(class_names)})")
    for key, value in model.metrics.items():
        print(f"  {key}: {value:.4f}")
    print(f"saved to {args.out}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from lqf_core.serving import Predictor

    predictor = Predictor.load(args.model, device=args.device,
                               weights_dir=weights_dirs(args.weights_dir))
    probs = predictor.predict_proba(args.images)
    for path, row in zip(args.images, probs, strict=True):
        label = predictor.class_names[int(row.argmax())]
        probabilities = {c: float(p) for c, p in zip(predictor.class_names, row, strict=True)}
        if args.json:
            print(json.dumps({"image": path, "label": label, "probabilities": probabilities}))
        else:
            top = sorted(probabilities.items(), key=lambda kv: -kv[1])[: args.top_k]
            print(f"{path}: {label}  " + "  ".join(f"{c}={p:.3f}" for c, p in top))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lqf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train on a folder of class sub-folders")
    train.add_argument("directory", help="ImageFolder layout: DIR/<class>/<image>")
    train.add_argument("--out", required=True, help="directory to write the model to")
    train.add_argument("--method", default="lqf", choices=[m.value for m in Method])
    train.add_argument("--backbone", default="mobilenet_v2")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--weights-dir", default=None, help="where backbone weight files are")
    for name, kind in (("image-size", int), ("val-fraction", float), ("suffix-blocks", int),
                       ("weight-decay", float), ("probe-l2", float), ("kappa", float),
                       ("max-iters", int), ("tol", float), ("epochs", int), ("lr", float),
                       ("leaky-slope", float), ("device", str), ("solver", str),
                       ("calibration", str)):
        train.add_argument(f"--{name}", type=kind, default=None)
    train.set_defaults(handler=_train)

    predict = sub.add_parser("predict", help="predict the class of images")
    predict.add_argument("model", help="a directory written by `lqf train`")
    predict.add_argument("images", nargs="+")
    predict.add_argument("--json", action="store_true", help="one JSON object per image")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--device", default="auto")
    predict.add_argument("--weights-dir", default=None)
    predict.set_defaults(handler=_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except LQFError as exc:
        print(f"lqf: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
