"""Sign in with an API key, sign out."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app.deps import Jobs, SettingsDep, tenant_for_key
from app.errors import ApiError
from app.ui.sessions import LOGIN_CSRF_COOKIE, SESSION_COOKIE, SESSION_TTL_S
from app.ui.web import UiSession, check_csrf, is_https, redirect, render, safe_next, session_store

router = APIRouter(prefix="/ui", include_in_schema=False)


def _login_page(request: Request, next_path: str, error: str | None = None,
                status_code: int = 200) -> HTMLResponse:
    token = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(32)
    response = render(request, "login.html", {"next": safe_next(next_path), "error": error,
                                              "login_csrf": token}, status_code=status_code)
    response.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=3600, httponly=True,
                        samesite="strict", secure=is_https(request), path="/ui")
    return response


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/ui") -> HTMLResponse:
    return _login_page(request, next)


@router.post("/login", response_model=None)
def login(request: Request, jobs: Jobs, settings: SettingsDep,
          api_key: Annotated[str, Form(max_length=500)] = "",
          csrf_token: Annotated[str, Form(max_length=200)] = "",
          next: Annotated[str, Form(max_length=2000)] = "/ui") -> Response:
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not expected or not secrets.compare_digest(expected, csrf_token):
        return _login_page(request, next, "The sign-in form expired: please try again.", 403)
    try:
        tenant = tenant_for_key(api_key.strip(), settings) if api_key.strip() else None
    except ApiError:
        tenant = None
    if tenant is None:
        return _login_page(request, next, "That API key is not valid.", 401)
    session = session_store(jobs).create(tenant)
    response = redirect(safe_next(next))
    response.set_cookie(SESSION_COOKIE, session.id, max_age=SESSION_TTL_S, httponly=True,
                        samesite="strict", secure=is_https(request), path="/")
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/ui")
    return response


@router.post("/logout")
def logout(session: UiSession, jobs: Jobs,
           csrf_token: Annotated[str, Form(max_length=200)] = "") -> RedirectResponse:
    check_csrf(session, csrf_token)
    session_store(jobs).delete(session.id)
    response = redirect("/ui/login")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
