"""Request bodies that carry images: multipart/form-data (files plus form fields) or JSON
(base64 strings plus fields). One parser for every route that takes images, so that both
encodings are validated by the same pydantic model and fail the same way."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from app.errors import ApiError, invalid

Options = TypeVar("Options", bound=BaseModel)


@dataclass
class ImageBody(Generic[Options]):
    options: Options  # the validated fields
    images: list[tuple[str, bytes]]  # (name for error messages, file bytes)


@dataclass(frozen=True)
class ImageBodySpec(Generic[Options]):
    """options: the fields both encodings share; json: the JSON body model (options plus
    `json_field`, a base64 string or a list of them); `upload_field`: the multipart field
    of the file(s)."""

    options: type[Options]
    json: type[Options]
    json_field: str
    upload_field: str

    def hint(self) -> str:
        fields = ", ".join(self.options.model_fields)
        return (f"send multipart/form-data ({fields}, {self.upload_field}) or JSON "
                f"({fields}, {self.json_field} as base64)")


async def parse_image_body(request: Request, spec: ImageBodySpec[Options],
                           max_images: int) -> ImageBody[Options]:
    """Validated fields and 1..max_images images; a precise 4xx otherwise."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        body = await _multipart(request, spec, max_images)
    elif content_type.startswith("application/json"):
        body = await _json(request, spec, max_images)
    else:
        raise ApiError(415, spec.hint(), "unsupported_media_type")
    for name, data in body.images:
        if not data:
            raise ApiError(422, f"{name} is empty", "invalid_data")
    return body


def _check_count(n: int, spec: ImageBodySpec[Any], max_images: int) -> None:
    if n == 0:
        raise ApiError(422, f"no images given ({spec.hint()})", "no_images")
    if n > max_images:
        raise ApiError(413, f"{n} images in one request, the limit is {max_images}",
                       "too_many_images")


async def _multipart(request: Request, spec: ImageBodySpec[Options], max_images: int
                     ) -> ImageBody[Options]:
    form = await request.form(max_files=max_images + 1)
    # Form fields arrive as text; pydantic's lax mode reads "3" and "true". An empty field
    # counts as absent, as HTML forms send unset inputs.
    fields = {k: v for k, v in form.items()
              if k in spec.options.model_fields and isinstance(v, str) and v != ""}
    try:
        options = spec.options.model_validate(fields)
    except ValidationError as exc:
        raise invalid(exc) from None
    files = [f for f in form.getlist(spec.upload_field) if isinstance(f, UploadFile)]
    if not files:  # e.g. `files` where this route takes `file`: name the right field
        elsewhere = sorted({k for k, v in form.multi_items() if isinstance(v, UploadFile)})
        if elsewhere:
            raise ApiError(422, f"the image goes in the form field '{spec.upload_field}', "
                                f"not {', '.join(repr(k) for k in elsewhere)} ({spec.hint()})",
                           "no_images")
    _check_count(len(files), spec, max_images)
    images = [(f.filename or f"{spec.upload_field}[{i}]", await f.read())
              for i, f in enumerate(files)]
    return ImageBody(options, images)


async def _json(request: Request, spec: ImageBodySpec[Options],
                max_images: int) -> ImageBody[Options]:
    try:
        body = spec.json.model_validate_json(await request.body())
    except ValidationError as exc:
        raise invalid(exc) from None
    value = getattr(body, spec.json_field)
    named = ([(spec.json_field, value)] if isinstance(value, str)
             else [(f"{spec.json_field}[{i}]", v) for i, v in enumerate(value)])
    _check_count(len(named), spec, max_images)
    images = []
    for name, text in named:
        try:
            images.append((name, base64.b64decode(text, validate=True)))
        except (binascii.Error, ValueError):
            raise ApiError(422, f"{name} is not valid base64", "invalid_data") from None
    return ImageBody(body, images)
