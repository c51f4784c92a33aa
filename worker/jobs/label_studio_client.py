"""Reading a Label Studio project: its tasks (JSON export) and their images, only from
the connection's own Label Studio."""

from __future__ import annotations

import base64
import binascii
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from lqf_core.data import IMAGE_SUFFIXES, check_image
from lqf_core.errors import InvalidDataError
from state.connections import Connection
from worker.lifecycle import JobFailure

FETCH_TIMEOUT_S = 30.0
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_TASKS = 20_000


def export_tasks(client: httpx.Client, conn: Connection, all_tasks: bool = False) -> list[Any]:
    """The project's annotated tasks (JSON export); every task with `all_tasks`."""
    try:
        params = {"exportType": "JSON", **({"download_all_tasks": "true"} if all_tasks else {})}
        r = client.get(f"api/projects/{conn.project}/export", params=params)
    except httpx.HTTPError as exc:
        raise JobFailure("label_studio_unreachable", f"could not reach Label Studio at "
                         f"{conn.label_studio_url} ({type(exc).__name__})") from None
    if r.status_code != 200:
        raise JobFailure("label_studio_error", f"Label Studio answered the export of project "
                         f"{conn.project} with HTTP {r.status_code}: {r.text[:200]}")
    tasks = r.json()
    if not isinstance(tasks, list) or len(tasks) > MAX_TASKS:
        raise JobFailure("label_studio_error", "the export is not a list of at most "
                         f"{MAX_TASKS} tasks")
    return tasks


def fetch_image(client: httpx.Client, base: str, source: str, task_id: Any) -> tuple[bytes, str]:
    """(bytes, file suffix) of a task's image: a data URI, or a file on the connection's
    Label Studio (any other address is refused: no request goes where a task says)."""
    where = f"task {task_id}"
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise JobFailure("invalid_data", f"{where}: the data URI is not base64") from None
        suffix = "." + header.removeprefix("data:image/").split(";")[0]
    else:
        url = urljoin(base, source)
        if urlsplit(url)[:2] != urlsplit(base)[:2]:
            raise JobFailure("invalid_data", f"{where}: {source[:100]} is not on the connected "
                                             f"Label Studio ({base}); it is not fetched")
        with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise JobFailure("label_studio_error",
                                 f"{where}: {url} answered HTTP {response.status_code}")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_IMAGE_BYTES:
                    raise JobFailure("invalid_data", f"{where}: image over {MAX_IMAGE_BYTES} B")
        data = bytes(body)
        suffix = PurePosixPath(urlsplit(url).path).suffix.lower()
    if suffix.lower() not in IMAGE_SUFFIXES:
        suffix = ".png"
    try:
        check_image(data, name=where)  # decodable, not a decompression bomb
    except InvalidDataError as exc:
        raise JobFailure("invalid_data", str(exc)) from None
    return data, suffix.lower()
