"""The dashboard (/ui) in a real headless Chromium against the real service: sign-in,
every page, live job progress, try-it with influence thumbnails, forget from review,
accessibility (axe-core) and layout at phone width; the same pages and live parts in
Firefox (WebDriver BiDi, tests/integration/firefox.py). Screenshots go to
$LQF_TEST_ARTIFACTS (default: the test's tmp dir)."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .browser import CHROMIUM_ARGS, REQUIRED, require_browser, serious_violations
from .datagen import make_image
from .firefox import Firefox, firefox_path
from .helpers import FINAL, KEYS, LONG_JOB, submit, ui_sign_in, wait_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser_setup() -> Iterator[tuple[Any, str]]:
    exe, axe_source = require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser, axe_source
        finally:
            browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = os.environ.get("LQF_TEST_ARTIFACTS")
    path = Path(out) / "dashboard" if out else tmp_path_factory.mktemp("dashboard-shots")
    path.mkdir(parents=True, exist_ok=True)
    return path


class Tab:
    """A page that records console errors and uncaught exceptions."""

    def __init__(self, browser: Any, base_url: str, viewport: dict[str, int] = DESKTOP):
        self.context = browser.new_context(base_url=base_url, viewport=viewport)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def sign_in(self, tenant: str = "alice") -> None:
        self.page.goto("/ui/login")
        self.page.get_by_label("API key").fill(KEYS[tenant])
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_url(re.compile(r".*/ui$"))

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser_setup: tuple[Any, str], service: Any) -> Iterator[Tab]:
    t = Tab(browser_setup[0], service.base_url)
    yield t
    t.close()


def _png(label: str = "a") -> bytes:
    import random
    return make_image(label, random.Random(7))


def test_sign_in_refuses_a_wrong_key_sets_a_strict_cookie_and_signs_out(tab: Tab) -> None:
    page = tab.page
    page.goto("/ui/jobs")
    assert "/ui/login" in page.url  # not signed in: to the login page, then back
    page.get_by_label("API key").fill("not-a-key")
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("alert").inner_text() == "That API key is not valid."
    assert not [c for c in tab.context.cookies() if c["name"] == "lqf_session"]

    page.get_by_label("API key").fill(KEYS["alice"])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r".*/ui/jobs$"))  # back where it was going
    cookie = next(c for c in tab.context.cookies() if c["name"] == "lqf_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("() => document.cookie").find("lqf_session") == -1

    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r".*/ui/login$"))
    page.goto("/ui/models")
    assert "/ui/login" in page.url
    assert tab.errors == [e for e in tab.errors if "401" in e]  # only the refused sign-in


def test_state_changing_forms_need_the_session_csrf_token(
        service: Any, lqf_model: dict[str, Any], shapes_dataset: dict[str, Any]) -> None:
    with httpx.Client(base_url=service.base_url, timeout=30) as c:
        # The login form itself is double-submit protected.
        c.get("/ui/login")
        assert c.post("/ui/login", data={"api_key": KEYS["alice"], "csrf_token": "x"}
                      ).status_code == 403
        r = ui_sign_in(c, "alice", "//evil.example/ui")
        assert r.status_code == 303 and "lqf_session" in r.cookies
        assert r.headers["location"] == "/ui"  # never an open redirect
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
        assert "default-src 'self'" in c.get("/ui").headers["content-security-policy"]

        model, dataset = lqf_model["id"], shapes_dataset["id"]
        with service.client("alice") as api:
            before = {j["id"] for j in api.get("/jobs", params={"limit": 1000}).json()["items"]}
            datasets_before = api.get("/datasets", params={"limit": 1000}).json()["total"]
        forms = [  # every form that changes state, without its token and with a wrong one
            ("/ui/datasets", {"name": "x"}, {"file": ("d.zip", b"PK", "application/zip")}),
            (f"/ui/datasets/{dataset}/train", {"method": "lqf"}, None),
            (f"/ui/jobs/{lqf_model['job_id']}/cancel", {}, None),
            (f"/ui/models/{model}/forget", {"item_id": "0"}, None),
            (f"/ui/models/{model}/review/crossfit", {}, None),
            (f"/ui/models/{model}/next", {"dataset_id": dataset}, None),
            ("/ui/logout", {}, None),
        ]
        for path, data, files in forms:
            for token in ({}, {"csrf_token": "wrong"}):
                r = c.post(path, data={**data, **token}, files=files)
                assert r.status_code == 403 and "CSRF" in r.text, (path, r.status_code)
                assert "text/html" in r.headers["content-type"]
        assert c.get("/ui/models").status_code == 200  # still signed in: logout was refused
        assert c.get(f"/models/{model}").status_code == 401  # the API wants Bearer
        with service.client("alice") as api:  # nothing was started or written
            after = {j["id"] for j in api.get("/jobs", params={"limit": 1000}).json()["items"]}
            assert after == before
            assert api.get("/datasets", params={"limit": 1000}).json()["total"] == \
                datasets_before

    with httpx.Client(base_url=service.base_url, timeout=30) as c:  # behind a TLS proxy
        r = ui_sign_in(c, "alice", **{"X-Forwarded-Proto": "https"})
        assert "secure" in r.headers["set-cookie"].lower()


def test_a_photo_is_shown_as_a_small_thumbnail(service: Any, alice: httpx.Client) -> None:
    """Items are shown at 96 px: a photo comes as a 192 px JPEG, not as its whole file,
    and a TIFF (which browsers do not display) as a PNG or JPEG too."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    from .helpers import ui_sign_in, upload

    archive = io.BytesIO()
    originals = {}
    with zipfile.ZipFile(archive, "w") as zf:  # within the test service's 4 MB expanded
        for name, size, fmt in (("cat/photo.jpg", (3000, 2000), "JPEG"),
                                ("dog/scan.tif", (600, 800), "TIFF")):
            out = io.BytesIO()
            yy, xx = np.mgrid[0:size[1], 0:size[0]]
            pixels = np.stack([xx * 255 // size[0], yy * 255 // size[1], (xx + yy) % 256], -1)
            Image.fromarray(pixels.astype(np.uint8)).save(out, format=fmt)
            originals[name] = out.getvalue()
            zf.writestr(name, originals[name])
    r = upload(alice, archive.getvalue(), name="photos")
    assert r.status_code == 201, r.text
    dataset = r.json()["id"]
    items = alice.get(f"/datasets/{dataset}/items").json()["items"]
    with httpx.Client(base_url=service.base_url, timeout=60) as browser:
        ui_sign_in(browser, "alice")
        page = browser.get(f"/ui/datasets/{dataset}").text
        for item in items:
            url = f"/ui/datasets/{dataset}/items/{item['id']}/thumbnail"
            assert url in page
            shown = browser.get(url)
            assert shown.status_code == 200
            assert shown.headers["content-type"] in ("image/jpeg", "image/png")
            with Image.open(io.BytesIO(shown.content)) as image:
                assert max(image.size) == 192
            assert len(shown.content) < len(originals[item["filename"]]) / 20


def test_another_tenant_sees_none_of_it(browser_setup: tuple[Any, str], service: Any,
                                        lqf_model: dict[str, Any],
                                        shapes_dataset: dict[str, Any]) -> None:
    bob = Tab(browser_setup[0], service.base_url)
    try:
        bob.sign_in("bob")
        for path in (f"/ui/models/{lqf_model['id']}", f"/ui/models/{lqf_model['id']}/try",
                     f"/ui/datasets/{shapes_dataset['id']}",
                     f"/ui/datasets/{shapes_dataset['id']}/items/0/image",
                     f"/ui/datasets/{shapes_dataset['id']}/items/0/thumbnail",
                     f"/ui/jobs/{lqf_model['job_id']}"):
            response = bob.page.goto(path)
            assert response.status == 404, path
        bob.page.goto("/ui/models")
        assert lqf_model["id"][:12] not in bob.page.content()
    finally:
        bob.close()


def _wait_for(page: Any, selector: str, reload_until: float) -> None:
    """Reload until `selector` shows (a posterior being built answers "not ready")."""
    while True:
        if page.locator(selector).count():
            return
        if time.monotonic() > reload_until:
            raise AssertionError(f"{selector} never appeared on {page.url}")
        time.sleep(1)
        page.reload()


def test_every_page_loads_clean_and_accessible(browser_setup: tuple[Any, str], tab: Tab,
                                               lqf_model: dict[str, Any],
                                               shapes_dataset: dict[str, Any],
                                               shots: Path) -> None:
    _, axe_source = browser_setup
    tab.sign_in()
    page = tab.page
    model = lqf_model["id"]
    pages = {
        "home": "/ui", "datasets": "/ui/datasets",
        "dataset": f"/ui/datasets/{shapes_dataset['id']}", "jobs": "/ui/jobs",
        "job": f"/ui/jobs/{lqf_model['job_id']}", "models": "/ui/models",
        "model": f"/ui/models/{model}", "try": f"/ui/models/{model}/try",
        "review": f"/ui/models/{model}/review", "next": f"/ui/models/{model}/next",
    }
    for name, path in pages.items():
        response = page.goto(path)
        assert response.status == 200, (path, response.status)
        page.wait_for_load_state("networkidle")
        if name == "model":  # the posterior-predictive diagram replaces the plain one
            page.wait_for_selector("#reliability svg .dot.posterior", state="attached",
                                   timeout=90_000)
            assert page.locator("table.confusion tbody tr").count() == len(lqf_model["classes"])
        if name == "review":
            _wait_for(page, "ul.review li.thumb", time.monotonic() + 90)
        violations = serious_violations(page, axe_source)
        assert violations == [], (path, violations)
        page.screenshot(path=shots / f"{name}.png", full_page=True)
    assert tab.errors == []
    # The check can fail: an input stripped of its label is a serious violation.
    page.goto("/ui/datasets")
    page.evaluate("() => document.querySelector('label[for=name]').remove()")
    assert "label" in {v["id"] for v in serious_violations(page, axe_source)}

    # Keyboard: the first Tab reaches the skip link, which moves focus to the content.
    page.goto("/ui/models")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")
    assert page.evaluate("() => document.activeElement.id") == "main"


def test_pages_fit_a_phone_screen(browser_setup: tuple[Any, str], service: Any,
                                  lqf_model: dict[str, Any], shots: Path) -> None:
    phone = Tab(browser_setup[0], service.base_url, viewport=PHONE)
    try:
        phone.sign_in()
        for name, path in (("model", f"/ui/models/{lqf_model['id']}"), ("jobs", "/ui/jobs"),
                           ("datasets", "/ui/datasets")):
            phone.page.goto(path)
            # Wide tables scroll inside their own box; the page itself never scrolls sideways.
            overflow = phone.page.evaluate(
                "() => document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, (path, overflow)
            phone.page.screenshot(path=shots / f"phone-{name}.png", full_page=True)
        assert phone.errors == []
    finally:
        phone.close()


def test_upload_and_a_jobs_progress_moves_live(tab: Tab, alice: httpx.Client,
                                               shapes_dataset: dict[str, Any],
                                               tmp_path: Path, shots: Path) -> None:
    from .datagen import folder_zip, make_samples

    tab.sign_in()
    page = tab.page
    archive = tmp_path / "pets.zip"
    archive.write_bytes(folder_zip(make_samples(6, seed=3)))
    page.goto("/ui/datasets")
    page.get_by_label("Zip of class folders, or images + labels.csv").set_input_files(archive)
    page.get_by_label("Name (optional)").fill("from-the-browser")
    page.get_by_role("button", name="Upload").click()
    page.wait_for_url(re.compile(r".*/ui/datasets/ds_[0-9a-f]{32}$"))
    assert page.locator("h1").inner_text() == "from-the-browser"
    assert page.locator("ul.thumbs img").count() > 0
    # Thumbnails load lazily: the first ones, in view, arrive.
    page.wait_for_function("() => { const i = document.querySelector('ul.thumbs img');"
                           " return i.complete && i.naturalWidth > 0; }", timeout=10_000)

    job = submit(alice, shapes_dataset["id"], **LONG_JOB)
    page.goto(f"/ui/jobs/{job['id']}")
    page.evaluate("""() => {
        window.__sameDocument = true;
        window.__shift = 0;
        new PerformanceObserver(list => list.getEntries().forEach(e => {
            if (!e.hadRecentInput) window.__shift += e.value; })
        ).observe({type: 'layout-shift', buffered: true});
    }""")
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(set(seen)) < 3:
        seen.append(page.evaluate("() => document.getElementById('job-progress').value"))
        time.sleep(0.5)
    assert len(set(seen)) >= 3, seen  # it moved, more than once
    assert page.evaluate("() => window.__sameDocument === true")  # without a reload
    page.wait_for_selector("#job-curve svg polyline")  # the loss curve, live
    assert page.evaluate("() => window.__shift") < 0.01
    page.screenshot(path=shots / "job-running.png", full_page=True)

    page.get_by_role("button", name="Cancel job").click()
    done = wait_job(alice, job["id"], FINAL, timeout=60)
    assert done["status"] == "cancelled"
    page.wait_for_selector(".status-cancelled", timeout=30_000)
    assert tab.errors == []


def test_try_it_shows_the_supporting_training_images(tab: Tab, lqf_model: dict[str, Any],
                                                     tmp_path: Path, shots: Path) -> None:
    tab.sign_in()
    page = tab.page
    image = tmp_path / "query.png"
    image.write_bytes(_png(lqf_model["classes"][0]))
    page.goto(f"/ui/models/{lqf_model['id']}/try")
    until = time.monotonic() + 90
    while True:
        page.get_by_label("Drop an image here, or choose one").set_input_files(image)
        page.get_by_role("button", name="Predict").click()
        page.wait_for_load_state("networkidle")
        if page.locator("#proponents img").count() or time.monotonic() > until:
            break
        time.sleep(1)  # the posterior was still being built
    assert page.locator("#try-result .big").inner_text() in lqf_model["classes"]
    # The uploaded image comes back embedded, as a thumbnail.
    assert page.locator("img.query").get_attribute("src").startswith("data:image/")
    assert page.evaluate("() => document.querySelector('img.query').naturalWidth") > 0
    assert page.locator("#proponents img").count() > 0
    assert 0 <= float(page.locator("#ood-score").inner_text()) <= 1
    assert float(page.locator("#variance-ratio").inner_text()) > 0
    page.locator("#opponents").scroll_into_view_if_needed()
    page.wait_for_function("() => [...document.querySelectorAll('#proponents img, "
                           "#opponents img')].every(i => i.complete && i.naturalWidth > 0)",
                           timeout=10_000)
    page.screenshot(path=shots / "try.png", full_page=True)
    assert tab.errors == []


def test_forget_from_review_makes_a_new_version(browser_setup: tuple[Any, str], tab: Tab,
                                                alice: httpx.Client,
                                                shapes_dataset: dict[str, Any],
                                                shots: Path) -> None:
    _, axe_source = browser_setup
    name = "dashboard-review"
    job = submit(alice, shapes_dataset["id"], method="lqf", model_name=name)
    done = wait_job(alice, job["id"], FINAL)
    assert done["status"] == "succeeded", done
    # a default 60-item job trains on every item and cross-fits its temperature
    assert "cv_accuracy" in alice.get(f"/models/{done['model_id']}").json()["metrics"]
    tab.sign_in()
    page = tab.page
    page.goto(f"/ui/models/{name}")
    assert page.locator("text=5-fold cross-fitting").count() == 1
    page.goto(f"/ui/models/{name}/review")
    _wait_for(page, "ul.review li.thumb", time.monotonic() + 90)
    first = page.locator("ul.review li.thumb").first
    item = int(first.locator("input[name=item_id]").get_attribute("value"))
    page.screenshot(path=shots / "review.png", full_page=True)
    first.get_by_role("button").click()  # one click
    page.wait_for_url(re.compile(r".*/ui/jobs/job_[0-9a-f]{32}$"))
    forget_job = page.url.rsplit("/", 1)[1]
    assert wait_job(alice, forget_job, FINAL)["status"] == "succeeded"
    page.wait_for_selector("#job-result a[href^='/ui/models/']", timeout=30_000)
    page.locator("#job-result a[href^='/ui/models/']").click()
    assert f"{name} v2" in page.locator("h1").inner_text()
    assert page.locator(f"text=#{item}").count() >= 1  # among the forgotten items
    versions = alice.get(f"/names/{name}").json()["versions"]
    assert [v["version"] for v in versions] == [1, 2]
    # The dataset page marks the forgotten item, still readable (contrast) and accessible.
    page.goto(f"/ui/datasets/{shapes_dataset['id']}")
    assert page.locator("li.thumb.excluded", has_text=f"#{item}").count() == 1
    assert serious_violations(page, axe_source) == []
    assert tab.errors == []


def test_the_dashboard_works_in_firefox(service: Any, alice: httpx.Client,
                                        lqf_model: dict[str, Any],
                                        shapes_dataset: dict[str, Any], tmp_path: Path,
                                        shots: Path) -> None:
    """The same pages and the same live parts (fetch, Server-Sent Events) in Firefox."""
    exe = firefox_path()
    if exe is None:
        message = "needs Firefox (apt-get install -y firefox-esr)"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    ff = Firefox(exe, tmp_path / "firefox-profile")
    base = service.base_url
    try:
        ff.goto(f"{base}/ui/login?next=/ui/models")
        ff.js(f"document.getElementById('api_key').value = {json.dumps(KEYS['alice'])}")
        ff.js("document.querySelector('main form').submit()")
        ff.wait_for("location.pathname === '/ui/models' && document.readyState === 'complete'")

        ff.goto(f"{base}/ui/models/{lqf_model['id']}")  # the posterior diagram, by fetch
        ff.wait_for("document.querySelector('#reliability svg .dot.posterior') !== null", 90)
        assert ff.js("document.querySelectorAll('table.confusion tbody tr').length") == \
            len(lqf_model["classes"])
        ff.screenshot(shots / "firefox-model.png")

        job = submit(alice, shapes_dataset["id"], **LONG_JOB)
        ff.goto(f"{base}/ui/jobs/{job['id']}")
        ff.js("window.__sameDocument = true")
        seen: list[float] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(set(seen)) < 3:
            seen.append(ff.js("document.getElementById('job-progress').value"))
            time.sleep(0.5)
        assert len(set(seen)) >= 3, seen  # live over EventSource
        assert ff.js("window.__sameDocument === true")
        alice.post(f"/jobs/{job['id']}/cancel")
        ff.wait_for("document.querySelector('.status-cancelled') !== null", 60)
        assert ff.errors == []
    finally:
        ff.close()


def test_a_failed_job_shows_its_error(tab: Tab, alice: httpx.Client,
                                      shapes_dataset: dict[str, Any]) -> None:
    # tiny_cnn has fewer feature blocks: the job fails as it starts, with invalid_config.
    job = submit(alice, shapes_dataset["id"], method="lqf",
                 hyperparameters={"image_size": 32, "suffix_blocks": 60})
    done = wait_job(alice, job["id"], FINAL)
    assert done["status"] == "failed", done
    tab.sign_in()
    tab.page.goto(f"/ui/jobs/{job['id']}")
    alert = tab.page.locator("#job-result [role=alert]").inner_text()
    assert done["error"]["code"] in alert and done["error"]["message"][:40] in alert
    assert tab.page.locator("#cancel-form").count() == 0  # nothing left to cancel
    assert tab.errors == []
