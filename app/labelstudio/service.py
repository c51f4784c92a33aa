"""Label Studio's ML-backend protocol on top of a trained model: parse the project's
labeling config, fetch each task's image, answer with `choices` predictions.

Label Studio sends `{"tasks": [...], "label_config": "<View>...</View>"}` to
`<backend url>/predict` and shows the `result` of each prediction as a pre-annotation.
An image classifier fits the `<Choices>` control over an `<Image>` object.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from app.errors import ApiError
from state import labelstudio as formats
from state.labelstudio import ChoicesControl


def parse_label_config(label_config: str) -> ChoicesControl:
    """The first `<Choices>` control that labels an `<Image>`; 422 when there is none."""
    try:
        return formats.parse_label_config(label_config)
    except formats.LabelStudioFormatError as exc:
        raise invalid(str(exc)) from None


def choose(probabilities: dict[str, float], control: ChoicesControl) -> tuple[str, float]:
    """The most probable class that is also one of the project's choices."""
    allowed = [c for c in probabilities if c in control.choices] if control.choices else list(
        probabilities)
    if not allowed:
        raise invalid(f"none of the model's classes {sorted(probabilities)} is a <Choice> of "
                       f"{control.from_name!r} ({list(control.choices)})")
    label = max(allowed, key=probabilities.__getitem__)
    return label, probabilities[label]


def task_image_source(task: Any, control: ChoicesControl, index: int) -> tuple[str, str]:
    """(task label for errors, the image URL or data URI) of one task."""
    try:
        source = formats.task_image(task, control)
    except formats.LabelStudioFormatError as exc:
        raise invalid(str(exc)) from None
    return f"task {task.get('id', index)}", source


class ImageFetcher:
    """Gets task images: data URIs inline; URLs only from the configured Label Studio.

    Fetching any URL a caller names would let the caller make this server request
    internal addresses (SSRF), so URLs must be on `LQF_LABEL_STUDIO_URL`; relative ones
    (Label Studio's `/data/upload/...`) are resolved against it and fetched with its
    API key.
    """

    def __init__(self, base_url: str, api_key: str, max_bytes: int, timeout_s: float = 30.0):
        self.base_url = base_url.rstrip("/") + "/" if base_url else ""
        self.api_key, self.max_bytes, self.timeout_s = api_key, max_bytes, timeout_s

    async def fetch(self, client: httpx.AsyncClient, name: str, source: str) -> bytes:
        if source.startswith("data:"):
            return self._data_uri(name, source)
        url = self._allowed_url(name, source)
        headers = {"Authorization": f"Token {self.api_key}"} if self.api_key else {}
        try:
            async with client.stream("GET", url, headers=headers,
                                     timeout=self.timeout_s) as response:
                if response.status_code != 200:
                    raise invalid(f"{name}: {url} answered HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise ApiError(413, f"{name}: {url} is larger than {self.max_bytes} "
                                            "bytes", "image_too_large")
                return bytes(body)
        except httpx.HTTPError as exc:
            raise invalid(f"{name}: could not fetch {url} ({exc.__class__.__name__})") from None

    def _data_uri(self, name: str, source: str) -> bytes:
        header, sep, payload = source.partition(",")
        if not sep or not header.endswith(";base64"):
            raise invalid(f"{name}: only base64 data URIs are supported")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise invalid(f"{name}: the data URI is not valid base64") from None
        if len(data) > self.max_bytes:
            raise ApiError(413, f"{name}: image larger than {self.max_bytes} bytes",
                           "image_too_large")
        return data

    def _allowed_url(self, name: str, source: str) -> str:
        if not self.base_url:
            raise invalid(f"{name}: the image is a URL ({source[:100]}); set "
                           "LQF_LABEL_STUDIO_URL (and LQF_LABEL_STUDIO_API_KEY) so this "
                           "server may fetch it from Label Studio, or import images as data "
                           "URIs")
        url = urljoin(self.base_url, source)
        base, target = urlsplit(self.base_url), urlsplit(url)
        if (target.scheme, target.netloc) != (base.scheme, base.netloc):
            raise invalid(f"{name}: {source[:100]} is not on LQF_LABEL_STUDIO_URL "
                           f"({self.base_url}); only Label Studio's own files are fetched")
        return url


def invalid(message: str) -> ApiError:
    return ApiError(422, message, "invalid_label_studio_request")
