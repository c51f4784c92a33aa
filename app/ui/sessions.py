"""Dashboard sessions: an API key exchanged for a random session id kept in Redis.

The cookie holds only the session id (HttpOnly, SameSite=Strict, Secure behind TLS).
Each session has its own CSRF token, which every state-changing form sends back.
"""

from __future__ import annotations

import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any

SESSION_COOKIE = "lqf_session"
# Login happens before there is a session: its form is protected by a double-submit token.
LOGIN_CSRF_COOKIE = "lqf_login_csrf"
SESSION_TTL_S = 8 * 3600


def _key(session_id: str) -> str:
    return f"lqf:ui:session:{session_id}"


@dataclass(frozen=True)
class Session:
    id: str
    tenant: str
    csrf: str

    def csrf_ok(self, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(str(presented).encode(),
                                                       self.csrf.encode())


class SessionStore:
    def __init__(self, redis: Any, ttl_s: int = SESSION_TTL_S):
        self.r, self.ttl_s = redis, ttl_s

    def create(self, tenant: str) -> Session:
        session = Session(secrets.token_urlsafe(32), tenant, secrets.token_urlsafe(32))
        self.r.set(_key(session.id), json.dumps({"tenant": tenant, "csrf": session.csrf}),
                   ex=self.ttl_s)
        return session

    def get(self, session_id: str | None) -> Session | None:
        # Session ids are token_urlsafe(32): 43 URL-safe characters; anything else is junk.
        if not session_id or len(session_id) > 64 or not session_id.replace("-", "").replace(
                "_", "").isalnum():
            return None
        raw = self.r.get(_key(session_id))
        if raw is None:
            return None
        data = json.loads(raw)
        return Session(session_id, data["tenant"], data["csrf"])

    def delete(self, session_id: str) -> None:
        self.r.delete(_key(session_id))
