"""The dashboard on a real default model: page timings in a real browser, and the
screenshots the README shows.

    python -m bench.dashboard                 # 30 shots of Fashion-MNIST (300 items)
    python -m bench.dashboard --shots 10

Starts the service as `make serve` does, uploads the images, trains a **default** `lqf`
job named `fashion` (MobileNetV2, no hyperparameters) over the API, then in headless
Chromium (Debian's, driven by Playwright) times, from the click or navigation to the
element that shows the answer:
  1. the model page, and its posterior-predictive reliability diagram (the first one waits
     for the posterior's build);
  2. try-it with one test image: prediction, uncertainty and the influence thumbnails;
  3. the review page (the closed-form mislabel ranking);
  4. one click on Forget -> the forget job -> version 2's page;
  5. label next: a rank job over a pool dataset of 200 test images -> the ranked batch.
Writes docs/results/dashboard.{json,md} and docs/screenshots/*.png.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.serve import RESULTS, Service, folder_zip, git_commit, machine, make_data, train
from tests.integration.browser import CHROMIUM_ARGS, chromium_path

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "docs" / "screenshots"


def timed(label: str, timings: dict[str, float], fn: Any) -> Any:
    started = time.perf_counter()
    out = fn()
    timings[label] = round(time.perf_counter() - started, 2)
    print(f"  {label}: {timings[label]:.2f} s", flush=True)
    return out


def run_browser(service: Service, model_id: str, pool_id: str, query: Path,
                shots: Path) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    if exe is None:
        raise SystemExit("needs chromium (apt-get install -y chromium)")
    timings: dict[str, float] = {}
    long_wait = 900_000  # ms: a posterior build or a job on a slow CPU
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        page = browser.new_context(base_url=service.base_url,
                                   viewport={"width": 1280, "height": 900}).new_page()
        page.goto("/ui/login")
        page.get_by_label("API key").fill(Service.KEY)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(re.compile(r".*/ui$"))

        timed("model page", timings, lambda: page.goto(f"/ui/models/{model_id}"))
        timed("posterior reliability (first: waits for the posterior build)", timings,
              lambda: page.wait_for_selector("#reliability svg .dot.posterior",
                                             state="attached", timeout=long_wait))
        page.screenshot(path=shots / "model.png", full_page=True)
        timed("posterior reliability (posterior built)", timings, lambda: (
            page.reload(), page.wait_for_selector("#reliability svg .dot.posterior",
                                                  state="attached", timeout=long_wait)))

        page.goto(f"/ui/models/{model_id}/try")
        page.get_by_label("Drop an image here, or choose one").set_input_files(query)
        timed("try it: prediction, uncertainty, influence thumbnails", timings, lambda: (
            page.get_by_role("button", name="Predict").click(),
            page.wait_for_selector("#proponents img", timeout=long_wait)))
        page.screenshot(path=shots / "try.png", full_page=True)

        timed("review page", timings, lambda: (
            page.goto(f"/ui/models/{model_id}/review"),
            page.wait_for_selector("ul.review li.thumb", timeout=long_wait)))
        page.screenshot(path=shots / "review.png", full_page=True)

        def forget() -> None:
            page.locator("ul.review li.thumb").first.get_by_role("button").click()
            page.wait_for_url(re.compile(r".*/ui/jobs/job_[0-9a-f]{32}$"))
            page.wait_for_selector("#job-result a[href^='/ui/models/']", timeout=long_wait)
            page.locator("#job-result a[href^='/ui/models/']").click()
            page.wait_for_selector("h1:has-text('v2')")
        timed("forget one item -> version 2 (a forget job)", timings, forget)

        def rank() -> None:
            page.goto(f"/ui/models/{model_id}/next")
            page.get_by_label("Pool of unlabeled images (a dataset)").select_option(pool_id)
            page.get_by_role("button", name="Rank the pool").click()
            page.wait_for_url(re.compile(r".*/ui/jobs/job_[0-9a-f]{32}$"))
            page.wait_for_selector("a:has-text('The items to label next')", timeout=long_wait)
            page.get_by_role("link", name="The items to label next").click()
            page.wait_for_selector("ol.thumbs img")
        timed("label next: rank job over the pool -> the batch", timings, rank)
        page.screenshot(path=shots / "next.png", full_page=True)

        page.goto("/ui/jobs")
        page.screenshot(path=shots / "jobs.png")
        browser.close()
    return timings


def markdown(result: dict[str, Any]) -> str:
    lines = [f"`{result['command']}` · {result['date']} · git {result['git']} · "
             f"{result['machine']['cpu']} ({result['machine']['nproc']} cores)", "",
             f"Default lqf job on {result['data']['items']} {result['data']['source']} "
             f"images: trained in {result['model']['train_seconds']:.1f} s.", "",
             "| step (in Chromium, to the element that shows the answer) | seconds |",
             "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["timings"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS / "dashboard.json")
    parser.add_argument("--screenshots", type=Path, default=SHOTS)
    args = parser.parse_args(argv)
    train_set, test_images, source = make_data(args.shots, 201, seed=0)
    args.screenshots.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": "python -m bench.dashboard" + (
            f" --shots {args.shots}" if args.shots != 30 else ""),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "git": git_commit(),
        "machine": machine(), "data": {"source": source, "items": len(train_set)}}
    with tempfile.TemporaryDirectory(prefix="lqf-dashboard-") as tmp:
        service = Service.under(Path(tmp), {})
        try:
            service.start()
            service.wait_ready(timeout=120)
            print(f"training a default lqf job on {len(train_set)} {source} images ...",
                  flush=True)
            record = train(service, train_set, "mobilenet_v2", {}, 1800, model_name="fashion")
            result["model"] = {"id": record["id"], "train_seconds": record["train_seconds"]}
            with service.client() as c:  # the pool: test images, their labels unused
                pool = [("unlabeled", data) for data in test_images[1:]] + \
                       [("unlabeled-too", test_images[0])]
                r = c.post("/datasets", files={"file": ("pool.zip", folder_zip(pool),
                                                        "application/zip")},
                           data={"name": "pool"})
                r.raise_for_status()
                pool_id = r.json()["id"]
            query = Path(tmp) / "query.png"
            query.write_bytes(test_images[0])
            result["timings"] = run_browser(service, record["id"], pool_id, query,
                                            args.screenshots)
        finally:
            service.stop()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
