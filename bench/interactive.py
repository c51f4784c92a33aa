"""Are the closed-form queries interactive? Timed over real HTTP on a default job.

    python -m bench.interactive            # 100 shots of Fashion-MNIST (1,000 items)
    python -m bench.interactive --shots 20 # a quicker look

Starts the service as `make serve` does (app.launcher), uploads the images, trains a
**default** `lqf` job (no hyperparameters), then times, one request at a time:
  1. the first `POST /predict` with `uncertainty=true` (1 image), asked again while it
     answers 503 `posterior_building` (Retry-After): the time to the first answer is the
     posterior's build (prefix pass over the training items, the quadratic, K-FAC
     factors, the OOD reference);
  2. `POST /predict` of 64 images, without and with `uncertainty=true`;
  3. `POST /models/{id}/influence` of one image (first order, and exact leave-one-out);
  4. `GET /models/{id}/self-influence?method=leverage`: the first call waits for every
     training item's leverage (the build's second stage, which runs in the background
     during 2 and 3); exact leave-one-out influence, then 2 and 3 again once the leverages
     are in; a second leverage call is served from the cache;
  5. `POST /models/{id}/rank` of 64 images for a batch of 10.
Repeated requests report the median and the maximum. Writes
`docs/results/interactive.{json,md}`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.serve import RESULTS, Service, git_commit, machine, make_data, train

REPEATS = 5


def timed(send: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = send()
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
    return response, elapsed


def repeated(send: Callable[[], httpx.Response], repeats: int = REPEATS) -> dict[str, Any]:
    seconds = [timed(send)[1] for _ in range(repeats)]
    return {"median_s": round(statistics.median(seconds), 3), "max_s": round(max(seconds), 3),
            "repeats": repeats, "seconds": [round(t, 3) for t in seconds]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.interactive", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=100)
    parser.add_argument("--train-timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=RESULTS / "interactive.json")
    args = parser.parse_args(argv)
    train_set, test_images, source = make_data(args.shots, 64, seed=0)
    result: dict[str, Any] = {
        "command": "python -m bench.interactive" + (
            f" --shots {args.shots}" if args.shots != 100 else ""),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "git": git_commit(),
        "machine": machine(), "data": {"source": source, "items": len(train_set)}}
    with tempfile.TemporaryDirectory(prefix="lqf-interactive-") as tmp:
        service = Service.under(Path(tmp), {"LQF_LOG_LEVEL": "INFO"})
        try:
            service.start()
            service.wait_ready(timeout=120)
            print(f"training a default lqf job on {len(train_set)} {source} images ...",
                  flush=True)
            record = train(service, train_set, "mobilenet_v2", {}, args.train_timeout)
            model_id = record["id"]
            result["model"] = {"id": model_id, "train_seconds": record["train_seconds"],
                               "hyperparameters": record.get("hyperparameters")}
            with service.client() as client:
                result["timings"] = measure(client, model_id, test_images)
            result["timings"]["posterior_build_s"] = logged_build_seconds(Path(tmp) / "api.log")
        finally:
            service.stop()
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out}")
    return 0


def measure(client: httpx.Client, model_id: str, images: list[bytes]) -> dict[str, Any]:
    def predict(n: int, uncertainty: bool) -> Callable[[], httpx.Response]:
        files = [("files", (f"t{i}.png", images[i], "image/png")) for i in range(n)]
        data = {"model_id": model_id, "uncertainty": str(uncertainty).lower()}
        return lambda: client.post("/predict", files=files, data=data)

    def influence(variant: str) -> Callable[[], httpx.Response]:
        files = {"file": ("t.png", images[0], "image/png")}
        return lambda: client.post(f"/models/{model_id}/influence", files=files,
                                   data={"top_k": "5", "variant": variant})

    def rank() -> httpx.Response:
        files = [("files", (f"t{i}.png", images[i], "image/png")) for i in range(64)]
        return client.post(f"/models/{model_id}/rank", files=files, data={"batch_size": "10"})

    def leverage() -> httpx.Response:
        return client.get(f"/models/{model_id}/self-influence",
                          params={"method": "leverage", "limit": 20})

    timings: dict[str, Any] = {}
    print("first uncertainty request (builds the posterior) ...", flush=True)
    started, refusals = time.perf_counter(), 0
    send = predict(1, True)
    while (response := send()).status_code == 503 and \
            response.json().get("code") == "posterior_building":
        refusals += 1  # the build goes on; ask again as Retry-After says
        time.sleep(float(response.headers.get("Retry-After", "5")))
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
    timings["first_uncertainty_answer_s"] = round(time.perf_counter() - started, 2)
    timings["posterior_building_503s"] = refusals
    timings["solver"] = response.json()["predictions"][0]["uncertainty"]["solver"]
    timings["predict_64"] = repeated(predict(64, False))
    timings["predict_64_uncertainty"] = repeated(predict(64, True))
    timings["influence_first_order"] = repeated(influence("first_order"))
    print("first leverage request (every training item's leverage) ...", flush=True)
    timings["first_leverage_request_s"] = round(timed(leverage)[1], 2)
    timings["influence_exact_loo"] = repeated(influence("exact_loo"))
    # The same requests again now that the leverages' stage no longer shares the posterior.
    timings["predict_64_uncertainty_after_leverages"] = repeated(predict(64, True))
    timings["influence_first_order_after_leverages"] = repeated(influence("first_order"))
    timings["leverage_cached"] = repeated(leverage)
    timings["rank_10_of_64"] = repeated(rank)
    return timings


def logged_build_seconds(api_log: Path) -> float | None:
    """The build's own duration, from the api's "posterior built" log line."""
    for line in api_log.read_text(errors="replace").splitlines():
        if "posterior built" in line:
            with contextlib.suppress(ValueError, KeyError):
                return float(json.loads(line)["seconds"])
    return None


def markdown(result: dict[str, Any]) -> str:
    t = result["timings"]
    rows = [("posterior build (the api's log)", t["posterior_build_s"], ""),
            ("first uncertainty answer (the build + 1 image; "
             f"{t['posterior_building_503s']} × 503 `posterior_building` before it)",
             t["first_uncertainty_answer_s"], ""),
            ("`/predict`, 64 images", t["predict_64"]["median_s"], t["predict_64"]["max_s"]),
            ("`/predict`, 64 images, uncertainty", t["predict_64_uncertainty"]["median_s"],
             t["predict_64_uncertainty"]["max_s"]),
            ("`/influence`, first order", t["influence_first_order"]["median_s"],
             t["influence_first_order"]["max_s"]),
            ("first `/self-influence?method=leverage` (all leverages)",
             t["first_leverage_request_s"], ""),
            ("`/influence`, exact_loo (leverages cached)", t["influence_exact_loo"]["median_s"],
             t["influence_exact_loo"]["max_s"]),
            *[(f"{name}, after the leverages", t[key]["median_s"], t[key]["max_s"])
              for name, key in (("`/predict`, 64 images, uncertainty",
                                 "predict_64_uncertainty_after_leverages"),
                                ("`/influence`, first order",
                                 "influence_first_order_after_leverages")) if key in t],
            ("`/self-influence?method=leverage`, cached", t["leverage_cached"]["median_s"],
             t["leverage_cached"]["max_s"]),
            ("`/models/{id}/rank`, 10 of 64 images", t["rank_10_of_64"]["median_s"],
             t["rank_10_of_64"]["max_s"])]
    lines = [f"# Interactive queries over HTTP\n\n`{result['command']}` — {result['date']}, "
             f"git {result['git']}, {result['machine']['cpu']} ({result['machine']['nproc']} "
             f"cores); a default lqf job on {result['data']['items']} "
             f"{result['data']['source']} images, trained in "
             f"{result['model']['train_seconds']} s; queries answered with "
             f"`{t['solver']}`.\n", "| request | median s | max s |", "|---|---|---|"]
    lines += [f"| {name} | {median} | {worst} |" for name, median, worst in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
