"""JPEG photos: decoded in full, or at the smallest DCT scale that covers the input size?

    python -m bench.jpeg_decode                       # 10 shots of 12 MP photos
    python -m bench.jpeg_decode --photo-size 1536x1152 --shots 20

No photo data set can be downloaded here, so the "photos" are Fashion-MNIST images
scaled up (bicubic) to a camera's size with a little sensor noise, saved as JPEG
(quality 90). They exercise the decoder as a phone photo does; they have none of a
photo's fine detail, so the accuracy columns say only that the scaled decode costs
nothing on these images, not on every photo.

For each decode (`jpeg_decode` "full", "scaled"), alternating A B A B: a default job
(`train_model`, nothing set but `jpeg_decode`) on the training photos, timed whole; the
decode and preprocessing of those photos alone (the job's load stage); the model's
accuracy on the test photos and the time to predict them. Then how often the two
decodes' models agree on the test photos, and what the input-size rule's look at the
photos costs read from their headers against a full decode (how it was done before).
Prints a table; writes docs/results/jpeg-decode.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.fashion_mnist import few_shot_indices, load_split
from bench.serve import RESULTS, git_commit, machine, write_results
from lqf_core.backbones import load_backbone
from lqf_core.config import JpegDecode, TrainConfig
from lqf_core.data import SIZE_SAMPLE, open_image, short_sides
from lqf_core.serving import Predictor
from lqf_core.train import train_model

CLASS_NAMES = [str(c) for c in range(10)]


def write_photos(images: np.ndarray, size: tuple[int, int], directory: Path,
                 seed: int) -> list[Path]:
    """Each 28 px image scaled up to `size`, with noise of a camera's (sd 3 levels)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(images):
        big = np.asarray(Image.fromarray(pixels).convert("RGB").resize(
            size, Image.Resampling.BICUBIC), dtype=np.float32)
        big += rng.normal(0, 3, big.shape).astype(np.float32)
        path = directory / f"{i:05d}.jpg"
        Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def run_job(decode: JpegDecode, train: list[Path], labels: list[int], test: list[Path],
            test_labels: np.ndarray, backbone: Any) -> dict[str, Any]:
    config = TrainConfig(jpeg_decode=decode, device="cpu")
    started = time.perf_counter()
    model = train_model(train, labels, CLASS_NAMES, config, backbone=backbone)
    job_s = time.perf_counter() - started
    preprocess = backbone.preprocess(model.config.input_size, decode)
    started = time.perf_counter()
    preprocess.batch(train)
    load_s = time.perf_counter() - started
    predictor = Predictor(model, device="cpu", backbone=backbone)
    started = time.perf_counter()
    probs = predictor.predict_proba(test)
    predict_s = time.perf_counter() - started
    predicted = probs.argmax(1)
    return {"decode": decode.value, "image_size": model.config.input_size,
            "job_s": round(job_s, 2), "load_s": round(load_s, 2),
            "predict_s": round(predict_s, 2),
            "accuracy": round(float((predicted == test_labels).mean()), 4),
            "predicted": predicted.tolist()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jpeg_decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--photo-size", default="4032x3024", help="a phone camera's, default")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "jpeg-decode.json")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.photo_size.split("x"))
    torch.set_num_threads(2)
    backbone = load_backbone("mobilenet_v2")
    x_pool, y_pool = load_split("train")
    x_test, y_test = load_split("t10k")
    idx = few_shot_indices(y_pool, args.shots, args.seed)
    test_idx = np.random.default_rng(args.seed).choice(len(y_test), args.test, replace=False)
    result: dict[str, Any] = {
        "command": " ".join(["python -m bench.jpeg_decode", *(argv or sys.argv[1:])]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "git": git_commit(),
        "machine": machine(), "photos": {"size": args.photo_size, "train": len(idx),
                                         "test": args.test, "quality": 90}}
    with tempfile.TemporaryDirectory(prefix="lqf-jpeg-") as tmp:
        print(f"writing {len(idx)} + {args.test} photos of {args.photo_size} ...", flush=True)
        train = write_photos(x_pool[idx], (width, height), Path(tmp) / "train", args.seed)
        test = write_photos(x_test[test_idx], (width, height), Path(tmp) / "test",
                            args.seed + 1)
        labels = y_pool[idx].tolist()
        sample = train[:SIZE_SAMPLE]
        started = time.perf_counter()
        decoded_sides = [min(open_image(p).size) for p in sample]
        full_s = time.perf_counter() - started
        started = time.perf_counter()
        header_sides = short_sides(sample)
        header_s = time.perf_counter() - started
        assert decoded_sides == header_sides
        result["size_rule"] = {"photos": len(sample), "full_decode_s": round(full_s, 2),
                               "headers_s": round(header_s, 3)}
        runs = []
        for repeat in range(args.repeats):
            for decode in (JpegDecode.FULL, JpegDecode.SCALED):
                print(f"repeat {repeat}: a default job, jpeg_decode {decode.value} ...",
                      flush=True)
                runs.append({"repeat": repeat, **run_job(decode, train, labels, test,
                                                         y_test[test_idx], backbone)})
    result["runs"] = runs
    by = {d: [r for r in runs if r["decode"] == d] for d in ("full", "scaled")}
    result["agreement"] = round(float(np.mean(
        np.asarray(by["full"][0]["predicted"]) == np.asarray(by["scaled"][0]["predicted"]))), 4)
    for r in runs:
        del r["predicted"]
    result["summary"] = {d: {k: round(statistics.median(r[k] for r in rs), 4)
                             for k in ("job_s", "load_s", "predict_s", "accuracy")}
                         for d, rs in by.items()}
    write_results(args.out, result, markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    s, photos = result["summary"], result["photos"]
    rule = result["size_rule"]
    lines = [f"# JPEG decoding: full against scaled\n\n`{result['command']}` — "
             f"{result['date']}, git {result['git']}, {result['machine']['cpu']} "
             f"({result['machine']['nproc']} cores). {photos['train']} training and "
             f"{photos['test']} test photos of {photos['size']} px (Fashion-MNIST scaled up, "
             f"JPEG quality {photos['quality']}); a default job on each decode, medians of "
             f"{len(result['runs']) // 2} (A B A B).\n",
             "| jpeg_decode | default job s | its load stage s | predict test photos s "
             "| test accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {d} | {v['job_s']} | {v['load_s']} | {v['predict_s']} | {v['accuracy']} |"
              for d, v in s.items()]
    lines += ["", f"The two models give the same class on {result['agreement']:.1%} of the "
                  "test photos. The input-size rule's look at "
                  f"{rule['photos']} photos: {rule['full_decode_s']} s decoding them in full "
                  f"(before), {rule['headers_s']} s from their headers (now)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
