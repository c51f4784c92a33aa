"""Pages for models: metrics and calibration, versions, try it, review, label next."""

from __future__ import annotations

import base64
import logging
from typing import Annotated, Any

import torch
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from app.deps import Artifacts, Jobs, SettingsDep
from app.errors import ApiError
from app.jobs import service as jobs_service
from app.models.service import get_record, require_lqf
from app.predict import service as predict_service
from app.ui.charts import reliability_diagram
from app.ui.evaluation import Evaluation, evaluate, evaluation_of
from app.ui.thumbnails import TRY_SIDE, thumbnail
from app.ui.web import UiSession, check_csrf, redirect, render
from lqf_core.artifacts import read_metadata
from lqf_core.config import Method
from state.artifacts import SELF_INFLUENCE_FILE, read_json
from state.records import ModelRecord
from state.registry import Registry, RegistryError

log = logging.getLogger("lqf.api")
router = APIRouter(prefix="/ui", include_in_schema=False)

# The posterior-predictive reliability diagram scores at most this many held-out items
# (in batches of the predict limit), so that it answers within the query deadline.
POSTERIOR_EVAL_MAX_ITEMS = 512
TRY_TOP_K = 5
INFLUENCE_THUMBNAILS = 6
# A query still waiting on the posterior, or past its deadline: the page says so.
QUERY_UNAVAILABLE = {"posterior_building", "leverages_building", "query_timeout"}


def item_image_url(dataset_id: str, item_id: int) -> str:
    return f"/ui/datasets/{dataset_id}/items/{item_id}/thumbnail"


def _name_entry(store: Artifacts, tenant: str, record: ModelRecord) -> Any:
    name = record.get("name")
    if not name:
        return None
    try:
        return Registry(store).get(tenant, name)
    except RegistryError:
        return None


def _held_out_labels(store: Artifacts, record: ModelRecord, item_ids: list[str]) -> list[int]:
    """Class indices of held-out items, from the dataset's manifest (which keeps excluded
    items too)."""
    index = {name: k for k, name in enumerate(record["classes"])}
    by_id = {it.id: it.label for it in store.manifest(record["dataset_id"]).items}
    return [index[by_id[int(i)]] for i in item_ids]


def _evaluation(store: Artifacts, record: ModelRecord, metadata: dict) -> Evaluation | None:
    heldout = metadata.get("info", {}).get("heldout")
    if not heldout or not heldout.get("item_ids"):
        return None
    try:
        labels = _held_out_labels(store, record, heldout["item_ids"])
    except (KeyError, FileNotFoundError):  # the dataset was deleted
        return None
    return evaluate(heldout, labels, record["classes"], metadata.get("temperature") or 1.0)


def _shade(count: int, row_total: int) -> int:
    return 0 if not row_total else min(9, round(9 * count / row_total))


@router.get("/models", response_class=HTMLResponse)
def model_list(request: Request, session: UiSession, store: Artifacts) -> HTMLResponse:
    return render(request, "models.html", {
        "models": store.list_model_records(session.tenant),
        "names": Registry(store).list(session.tenant),
    }, session=session)


@router.get("/models/{model_ref}", response_class=HTMLResponse)
def model_detail(request: Request, model_ref: str, session: UiSession,
                 store: Artifacts) -> HTMLResponse:
    record = get_record(store, session.tenant, model_ref)
    metadata = read_metadata(store.model_dir(record["id"]))
    evaluation = _evaluation(store, record, metadata)
    reliability = None
    if evaluation is not None:
        reliability = reliability_diagram(
            [("served model", "plain", evaluation.bins)],
            label=f"Reliability on {evaluation.count} held-out items")
    entry = _name_entry(store, session.tenant, record)
    return render(request, "model.html", {
        "model": record, "info": metadata.get("info", {}),
        "temperature": metadata.get("temperature"), "config": metadata.get("config", {}),
        "evaluation": evaluation, "reliability": reliability, "shade": _shade,
        "name_entry": entry, "aliases": entry.all_aliases() if entry else {},
        "is_lqf": record["method"] == Method.LQF.value,
    }, session=session)


@router.get("/models/{model_ref}/reliability", response_class=HTMLResponse)
async def posterior_reliability(request: Request, model_ref: str, session: UiSession,
                                store: Artifacts) -> HTMLResponse:
    """Reliability of the held-out items with and without the posterior predictive: a
    fragment the model page loads, since the posterior may take a while to build."""
    posteriors = request.app.state.posteriors
    deadline = posteriors.deadline()
    record = await run_in_threadpool(get_record, store, session.tenant, model_ref)
    require_lqf(record, "the posterior predictive")
    metadata = await run_in_threadpool(read_metadata, store.model_dir(record["id"]))
    heldout = metadata.get("info", {}).get("heldout") or {}
    if heldout.get("split") != "val" or not heldout.get("item_ids"):
        return render(request, "_message.html", {"message": (
            "The posterior predictive needs items held out of training; this model has "
            "none (an exact-solver model's held-out outputs are leave-one-out).")})
    plain = await run_in_threadpool(_evaluation, store, record, metadata)
    assert plain is not None
    item_ids = heldout["item_ids"][:POSTERIOR_EVAL_MAX_ITEMS]
    entry = await posteriors.get(store, record, request.app.state.predictors, deadline)
    x = await run_in_threadpool(_item_tensor, store, record, entry.predictor, item_ids)
    step = request.app.state.predictors.settings.max_predict_images
    probs = []
    for start in range(0, len(item_ids), step):
        out = await posteriors.run(deadline, entry.uncertainty, x[start:start + step], deadline)
        probs.extend([[u["probabilities"][c] for c in record["classes"]] for u in out])
    labels = torch.as_tensor(_held_out_labels(store, record, item_ids))
    posterior = evaluation_of("val", torch.tensor(probs, dtype=torch.float64), labels,
                              record["classes"])
    chart = reliability_diagram(
        [("served model", "plain", plain.bins), ("posterior predictive", "posterior",
                                                  posterior.bins)],
        label="Reliability with and without the posterior predictive")
    return render(request, "_reliability.html", {"chart": chart, "plain": plain,
                                                 "posterior": posterior,
                                                 "solver": entry.solver})


def _item_tensor(store: Artifacts, record: ModelRecord, predictor: Any,
                 item_ids: list[str]) -> torch.Tensor:
    manifest = store.manifest(record["dataset_id"])
    root = store.dataset_dir(record["dataset_id"])
    files = {it.id: root / it.file for it in manifest.items}
    return torch.stack([predictor.load_image(files[int(i)].read_bytes(), name=str(i))
                        for i in item_ids])


# -- try it -----------------------------------------------------------------------------
@router.get("/models/{model_ref}/try", response_class=HTMLResponse)
def try_form(request: Request, model_ref: str, session: UiSession,
             store: Artifacts) -> HTMLResponse:
    record = get_record(store, session.tenant, model_ref)
    return render(request, "try.html", {"model": record, "result": None}, session=session)


@router.post("/models/{model_ref}/try", response_class=HTMLResponse)
async def try_image(request: Request, model_ref: str, session: UiSession, store: Artifacts,
                    file: Annotated[UploadFile, File()],
                    csrf_token: Annotated[str, Form(max_length=200)] = "") -> HTMLResponse:
    check_csrf(session, csrf_token)
    record = await run_in_threadpool(get_record, store, session.tenant, model_ref)
    data = await file.read()
    if not data:
        raise ApiError(422, "choose an image file first", "empty_file")
    name = file.filename or "image"
    predictors, posteriors = request.app.state.predictors, request.app.state.posteriors
    deadline = posteriors.deadline()
    loaded = await predictors.get(store, record["id"], record["model_version"])
    x = await run_in_threadpool(predict_service.prepare, loaded.predictor, [(name, data)])
    prediction = (await predict_service.predict(loaded, x, TRY_TOP_K))[0]
    result: dict[str, Any] = {"prediction": prediction, "image_name": name,
                              "image_data": await run_in_threadpool(_data_url, data)}
    if record["method"] == Method.LQF.value:
        try:
            entry = await posteriors.get(store, record, predictors, deadline)
            result["uncertainty"] = (await posteriors.run(
                deadline, entry.uncertainty, x, deadline))[0]
            influence = await posteriors.run(deadline, entry.influence, x,
                                             INFLUENCE_THUMBNAILS, False, deadline)
            for side in ("proponents", "opponents"):
                for item in influence[side]:
                    item["thumbnail"] = item_image_url(entry.dataset_id, item["item_id"])
            result["influence"] = influence
            result["influence_solver"] = entry.solver
        except ApiError as exc:
            if exc.code not in QUERY_UNAVAILABLE:
                raise
            result["unavailable"] = exc.detail
            result["retry_after"] = (exc.headers or {}).get("Retry-After")
    return render(request, "try.html", {"model": record, "result": result}, session=session)


def _data_url(data: bytes) -> str:
    """The uploaded image (it decoded for the prediction), shown back beside its answer
    as a small embedded thumbnail, whatever its size or format."""
    body, media_type = thumbnail(data, TRY_SIDE)
    return f"data:{media_type};base64,{base64.b64encode(body).decode()}"


# -- review -----------------------------------------------------------------------------
@router.get("/models/{model_ref}/review", response_class=HTMLResponse)
async def review(request: Request, model_ref: str, session: UiSession, store: Artifacts,
                 limit: Annotated[int, Query(ge=1, le=200)] = 24) -> HTMLResponse:
    record = await run_in_threadpool(get_record, store, session.tenant, model_ref)
    context: dict[str, Any] = {"model": record, "items": [], "method": None, "note": None}
    if record["method"] != Method.LQF.value:
        context["note"] = "Mislabel scores come from the linear-quadratic model: only lqf " \
                          "models have them."
        return render(request, "review.html", context, session=session)
    try:
        stored = await run_in_threadpool(store.read_model_json, record["id"],
                                         SELF_INFLUENCE_FILE)
    except FileNotFoundError:
        stored = None
    if stored is not None:
        context.update(method=f"cross-fitted ({stored['folds']} folds)",
                       items=stored["items"][:limit])
    else:
        posteriors = request.app.state.posteriors
        deadline = posteriors.deadline()
        try:
            entry = await posteriors.get(store, record, request.app.state.predictors, deadline,
                                         leverages=True)
            items, _ = await posteriors.run(deadline, entry.self_influence, limit, deadline)
            context.update(items=items, method=f"closed-form leave-one-out residual "
                                               f"({entry.self_influence_solver})")
        except ApiError as exc:
            if exc.code not in QUERY_UNAVAILABLE:
                raise
            context["note"] = str(exc.detail)
    for item in context["items"]:
        item["thumbnail"] = item_image_url(record["dataset_id"], item["item_id"])
    return render(request, "review.html", context, session=session)


@router.post("/models/{model_ref}/review/crossfit")
def start_crossfit(model_ref: str, session: UiSession, jobs: Jobs, store: Artifacts,
                   settings: SettingsDep,
                   csrf_token: Annotated[str, Form(max_length=200)] = "") -> RedirectResponse:
    check_csrf(session, csrf_token)
    record = get_record(store, session.tenant, model_ref)
    require_lqf(record, "mislabel scores")
    job = jobs_service.start_self_influence(jobs, store, settings, session.tenant, record)
    return redirect(f"/ui/jobs/{job['id']}")


@router.post("/models/{model_ref}/forget")
def forget_item(model_ref: str, session: UiSession, jobs: Jobs, store: Artifacts,
                settings: SettingsDep, item_id: Annotated[int, Form(ge=0)],
                csrf_token: Annotated[str, Form(max_length=200)] = "") -> RedirectResponse:
    """One click: a forget job without this item, whose model is the name's next version."""
    check_csrf(session, csrf_token)
    record = get_record(store, session.tenant, model_ref)
    job, _ = jobs_service.create_forget(jobs, store, settings, session.tenant, record["id"],
                                        [item_id], None)
    return redirect(f"/ui/jobs/{job['id']}")


# -- label next -------------------------------------------------------------------------
@router.get("/models/{model_ref}/next", response_class=HTMLResponse)
def label_next(request: Request, model_ref: str, session: UiSession,
               store: Artifacts) -> HTMLResponse:
    record = get_record(store, session.tenant, model_ref)
    rankings = []
    directory = store.model_dir(record["id"]) / "rankings"
    if directory.is_dir():
        for path in sorted(directory.glob("job_*.json")):
            try:
                rankings.append(read_json(path))
            except (OSError, ValueError):
                continue
    rankings.sort(key=lambda r: r.get("created_at", ""), reverse=True)
    latest = rankings[0] if rankings else None
    if latest is not None:
        for item in latest["items"]:
            item["thumbnail"] = item_image_url(latest["dataset_id"], item["item_id"])
    datasets = [d for d in store.list_dataset_metas(session.tenant)
                if d["id"] != record["dataset_id"]]
    return render(request, "next.html", {
        "model": record, "latest": latest, "datasets": datasets,
        "is_lqf": record["method"] == Method.LQF.value,
    }, session=session)


@router.post("/models/{model_ref}/next")
def start_ranking(model_ref: str, session: UiSession, jobs: Jobs, store: Artifacts,
                  settings: SettingsDep, dataset_id: Annotated[str, Form(max_length=100)],
                  batch_size: Annotated[int, Form(ge=1, le=1000)] = 20,
                  csrf_token: Annotated[str, Form(max_length=200)] = "") -> RedirectResponse:
    check_csrf(session, csrf_token)
    record = get_record(store, session.tenant, model_ref)
    require_lqf(record, "ranking")
    job, _ = jobs_service.create_rank(jobs, store, settings, session.tenant, record,
                                      dataset_id, batch_size, None)
    return redirect(f"/ui/jobs/{job['id']}")
