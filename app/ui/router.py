"""Mounts the dashboard on the app: /ui pages, /ui/static files, HTML errors."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from app.ui import auth_routes, data_routes, model_routes
from app.ui.web import HERE, LoginRequired, error_page, login_redirect


def install(app: FastAPI) -> None:
    # Static files before the page routes, so /ui/static/... never reaches a page route.
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    for module in (auth_routes, data_routes, model_routes):
        app.include_router(module.router)
    app.state.html_errors = error_page

    @app.exception_handler(LoginRequired)
    async def _login_required(_: Request, exc: LoginRequired) -> RedirectResponse:
        return login_redirect(exc.next_path)
