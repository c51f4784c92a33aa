from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import Artifacts, Jobs, SettingsDep

router = APIRouter(tags=["ops"])


@router.get("/livez")
async def livez() -> dict[str, str]:
    # Touches nothing: answers as long as the event loop turns.
    return {"status": "ok"}


@router.get("/readyz")
def readyz(jobs: Jobs, settings: SettingsDep, store: Artifacts) -> JSONResponse:
    checks: dict[str, object] = {}
    try:
        checks["redis"] = jobs.ping()
    except Exception as exc:
        checks["redis"] = False
        checks["redis_error"] = type(exc).__name__
    try:
        workers = jobs.alive_workers(settings.worker_stale_s) if checks["redis"] else []
    except Exception:
        workers = []
    checks["workers"] = len(workers)
    checks["artifacts"] = store.reachable()
    ready = bool(checks["redis"]) and len(workers) > 0 and bool(checks["artifacts"])
    body = {"status": "ready" if ready else "not ready", "checks": checks}
    if not ready:
        body["detail"] = ("Redis unreachable" if not checks["redis"] else
                          "artifact store unreachable" if not checks["artifacts"] else
                          "no live worker")
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
