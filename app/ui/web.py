"""What every dashboard page shares: templates, the signed-in session, CSRF, headers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from app.deps import Jobs, SettingsDep
from app.errors import ApiError
from app.limits import admit_request
from app.ui.sessions import SESSION_COOKIE, Session, SessionStore

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")

# Only our own scripts, styles and images; thumbnails of try-it uploads are data: URLs.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class LoginRequired(Exception):
    """No valid session: pages redirect to the login page, then back."""

    def __init__(self, next_path: str):
        super().__init__(next_path)
        self.next_path = next_path


def session_store(jobs: Jobs) -> SessionStore:
    return SessionStore(jobs.r)


def current_session(request: Request, jobs: Jobs, settings: SettingsDep) -> Session:
    session = session_store(jobs).get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)
    admit_request(session.tenant, settings)
    return session


UiSession = Annotated[Session, Depends(current_session)]


def check_csrf(session: Session, token: str | None) -> None:
    if not session.csrf_ok(token):
        raise ApiError(403, "the form's CSRF token is missing or out of date: reload the "
                            "page and try again", "csrf_failed")


def safe_next(target: str | None) -> str:
    """Only a path of the dashboard itself: never an open redirect."""
    if target and target.startswith("/ui") and not target.startswith("//") \
            and "\\" not in target:
        return target
    return "/ui"


def is_https(request: Request) -> bool:
    return request.url.scheme == "https" or \
        request.headers.get("x-forwarded-proto", "").lower() == "https"


def render(request: Request, template: str, context: dict[str, Any],
           status_code: int = 200, session: Session | None = None) -> HTMLResponse:
    response = templates.TemplateResponse(
        request, template, {"session": session, **context}, status_code=status_code)
    response.headers.update(SECURITY_HEADERS)
    return response


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers=SECURITY_HEADERS)


def login_redirect(next_path: str) -> RedirectResponse:
    return redirect(f"/ui/login?next={quote(safe_next(next_path), safe='/')}")


def error_page(request: Request, status: int, detail: Any, code: str) -> HTMLResponse:
    if isinstance(detail, list):  # pydantic's list: say where and what
        detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}"
                           for d in detail)
    return render(request, "error.html", {"status": status, "detail": str(detail),
                                          "code": code}, status_code=status)
