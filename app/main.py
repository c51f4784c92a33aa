"""The FastAPI application: `uvicorn --factory app.main:create_app` (or `app.main:app`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from prometheus_client import REGISTRY
from starlette.concurrency import run_in_threadpool

from app.config import Settings, get_settings
from app.datasets.router import router as datasets_router
from app.deps import get_artifacts, get_job_store
from app.errors import ERROR_RESPONSES, install_error_handlers
from app.jobs.router import router as jobs_router
from app.labelstudio.connections import manage as labelstudio_connections
from app.labelstudio.connections import protocol as labelstudio_protocol
from app.labelstudio.router import router as labelstudio_router
from app.metrics import MetricsMiddleware, RedisCollector
from app.models.router import router as models_router
from app.names.router import router as names_router
from app.ops.router import router as ops_router
from app.predict.router import router as predict_router
from app.predict.service import PredictorCache
from app.queries.router import router as queries_router
from app.queries.service import PosteriorCache
from app.ui.router import install as install_dashboard
from app.uploads import BodySizeLimit
from state.logs import configure_logging

log = logging.getLogger("lqf.api")
_collector: RedisCollector | None = None


async def _sweep(settings: Settings) -> None:
    """Fail jobs whose worker died, even when no worker is left to notice."""
    while True:
        await asyncio.sleep(settings.sweep_interval_s)
        try:
            for job_id in await run_in_threadpool(get_job_store().sweep_lost):
                log.warning("job lost its worker", extra={"job_id": job_id})
        except Exception as exc:
            log.warning("sweep failed", extra={"error": repr(exc)})


def _register_collector(settings: Settings) -> None:
    global _collector
    if _collector is not None:
        REGISTRY.unregister(_collector)
    _collector = RedisCollector(get_job_store, settings.queue, settings.worker_stale_s)
    REGISTRY.register(_collector)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    settings.tenant_keys()  # a malformed LQF_API_KEYS stops the start, loudly
    get_artifacts().clean_staging()
    app.state.predictors = PredictorCache(settings)
    app.state.posteriors = PosteriorCache(settings)
    sweeper = asyncio.create_task(_sweep(settings))
    log.info("api ready", extra={"data_dir": str(settings.data_dir)})
    try:
        yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await app.state.predictors.close()
        await app.state.posteriors.close()


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        title="LQF Serve",
        version="0.1.0",
        description="Train linear-quadratic fine-tuned image classifiers as background jobs "
        "and serve them. Authenticate with `Authorization: Bearer <api key>`.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # Routes match in this order: the hot path (/predict) first.
    for router in (predict_router, ops_router, datasets_router, jobs_router, models_router,
                   names_router, queries_router, labelstudio_connections,
                   labelstudio_protocol, labelstudio_router):
        app.include_router(router, responses=ERROR_RESPONSES)
    install_dashboard(app)
    app.add_middleware(BodySizeLimit, limit=settings.max_upload_bytes,
                       idle_s=settings.body_idle_timeout_s, total_s=settings.body_timeout_s)
    app.add_middleware(MetricsMiddleware)
    _register_collector(settings)
    return app


app = create_app()
