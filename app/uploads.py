"""Request-body guard: refuse an oversized body before it is read into a temp file, and a
body that stalls or takes too long to arrive (a slow client must not hold a request open)."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ApiError


class BodySizeLimit:
    """413 for a body larger than `limit` bytes, by Content-Length or while streaming; 408
    for a body with no bytes for `idle_s`, or not complete after `total_s`.

    A refusal while the body streams is answered here, and the app is told the client
    went away (so it stops reading); whatever it would answer then is dropped. Raising
    instead would reach FastAPI's body parser, which turns any error into a 400."""

    def __init__(self, app: ASGIApp, limit: int, idle_s: float = 60.0, total_s: float = 900.0):
        self.app, self.limit, self.idle_s, self.total_s = app, limit, idle_s, total_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _refuse(send, 413, f"request body exceeds {self.limit} bytes", "too_large")
            return
        seen, complete, deadline = 0, False, time.monotonic() + self.total_s
        started = refused = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def refuse(status: int, detail: str, code: str) -> Message:
            nonlocal refused
            if not started:
                await _refuse(send, status, detail, code)
            refused = True
            return {"type": "http.disconnect"}

        async def counted() -> Message:
            nonlocal seen, complete
            if complete:  # past the body: waiting for a disconnect (SSE) is not bounded here
                return await receive()
            wait = min(self.idle_s, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait, 0.001))
            except TimeoutError:
                return await refuse(
                    408, f"the request body stopped arriving: nothing for {self.idle_s:g} s, "
                         f"or not complete after {self.total_s:g} s (LQF_BODY_IDLE_TIMEOUT_S, "
                         "LQF_BODY_TIMEOUT_S)", "body_timeout")
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    return await refuse(413, f"request body exceeds {self.limit} bytes",
                                        "too_large")
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        await self.app(scope, counted, guarded_send)


async def _refuse(send: Send, status: int, detail: str, code: str) -> None:
    body = json.dumps({"detail": detail, "code": code}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def check_upload(upload: UploadFile, limit: int) -> None:
    if upload.size is not None and upload.size > limit:
        raise ApiError(413, f"upload of {upload.size} bytes exceeds the limit of {limit}",
                       "too_large")
