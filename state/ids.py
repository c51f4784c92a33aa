"""Ids of stored things and the timestamps records carry."""

from __future__ import annotations

import re
import time
import uuid

_ID_RE = re.compile(r"^[a-z]{2,4}_[0-9a-f]{32}$")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def is_valid_id(value: str, prefix: str) -> bool:
    """Ids become path components, so anything but our own format is refused."""
    return bool(_ID_RE.match(value)) and value.startswith(prefix + "_")


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
