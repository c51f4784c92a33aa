"""Save and load a TrainedModel: `model.safetensors` (tensors) + `model.json` (metadata).

The JSON carries the backbone, class names, config, metrics, provenance, library
versions, a SHA-256 content hash of the tensors file and the model version: a hash of
the tensors' hash and of everything else that decides an answer (method, backbone,
classes, config, temperature). Loading checks the format version and both hashes, so a
truncated or edited artifact fails loudly, and two models answer alike exactly when
their versions are equal.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import safetensors
import torch
from safetensors.torch import load_file, save_file

import lqf_core
from lqf_core.config import Method, TrainConfig
from lqf_core.errors import IncompatibleModelError, InvalidConfigError
from lqf_core.model import TrainedModel

FORMAT = "lqf-model"
FORMAT_VERSION = 1
TENSORS_FILE = "model.safetensors"
METADATA_FILE = "model.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_version(content_hash: str, metadata: dict) -> str:
    """The served model's identity: its tensors and every field that changes an answer.

    The tensors alone are not enough: a refit temperature changes every probability.
    """
    served = {key: metadata[key] for key in ("method", "backbone", "class_names", "config",
                                              "temperature")}
    served["content_hash"] = content_hash
    canonical = json.dumps(served, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def save_model(model: TrainedModel, directory: str | Path) -> str:
    """Write the artifact into `directory` (created) and return its model version.

    Both files are written to temporary names and renamed, so a crash never leaves a
    half-written model behind under the final names.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.tensors.items()}
    fd, tmp_tensors = tempfile.mkstemp(dir=directory, suffix=".safetensors.tmp")
    os.close(fd)
    save_file(tensors, tmp_tensors)
    content_hash = _sha256(Path(tmp_tensors))
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": model.method.value,
        "backbone": model.config.backbone,
        "class_names": model.class_names,
        "config": model.config.to_dict(),
        "temperature": model.temperature,
        "metrics": model.metrics,
        "info": model.info,
        "versions": {"lqf_core": lqf_core.__version__, "torch": torch.__version__,
                     "safetensors": safetensors.__version__},
        "content_hash": content_hash,
    }
    # Through JSON first, so the version hashes exactly what a reader will see.
    metadata = json.loads(json.dumps(metadata, default=str))
    metadata["model_version"] = _model_version(content_hash, metadata)
    fd, tmp_meta = tempfile.mkstemp(dir=directory, suffix=".json.tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(metadata, handle, indent=2, default=str)
    os.replace(tmp_tensors, directory / TENSORS_FILE)
    os.replace(tmp_meta, directory / METADATA_FILE)
    return metadata["model_version"]


def model_version(metadata: dict) -> str:
    """The version of a saved model (its tensors' hash for models saved before versions)."""
    return metadata.get("model_version") or metadata["content_hash"]


def read_metadata(directory: str | Path) -> dict:
    """The artifact's JSON metadata, validated for format and version."""
    path = Path(directory) / METADATA_FILE
    try:
        metadata = json.loads(path.read_text())
    except FileNotFoundError:
        raise IncompatibleModelError(f"{path}: no such file; not a saved model") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IncompatibleModelError(f"{path}: not valid JSON ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise IncompatibleModelError(
            f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r}"
        )
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise IncompatibleModelError(
            f"{path}: format version {version}, this lqf_core reads version {FORMAT_VERSION}"
        )
    return metadata


# A saved config holds every field of its time. A field added later, whose default then
# changed, must read as what that model was trained with, not as today's default: models
# saved before the regularizer existed were fitted on the isotropic ridge, and those
# saved before jpeg_decode decoded JPEGs in full.
FIELDS_BEFORE_THEY_WERE_SAVED = {"regularizer": "isotropic", "jpeg_decode": "full"}


def load_model(directory: str | Path) -> TrainedModel:
    """Load an artifact written by `save_model`; raises IncompatibleModelError."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    tensors_path = directory / TENSORS_FILE
    if not tensors_path.is_file():
        raise IncompatibleModelError(f"{tensors_path}: no such file")
    actual = _sha256(tensors_path)
    if actual != metadata.get("content_hash"):
        raise IncompatibleModelError(
            f"{tensors_path}: content hash {actual[:12]} does not match the metadata's "
            f"{str(metadata.get('content_hash'))[:12]}; the artifact is corrupt or was edited"
        )
    if "model_version" in metadata:
        try:
            expected = _model_version(actual, metadata)
        except KeyError as exc:
            raise IncompatibleModelError(f"{directory}: metadata lacks {exc}") from None
        if expected != metadata["model_version"]:
            raise IncompatibleModelError(
                f"{directory / METADATA_FILE}: its fields do not match its model version "
                f"{str(metadata['model_version'])[:12]}; the metadata was edited")
    try:
        config = TrainConfig.from_dict({**FIELDS_BEFORE_THEY_WERE_SAVED, **metadata["config"]})
        method = Method(metadata["method"])
        tensors = load_file(str(tensors_path))
    except (KeyError, ValueError, InvalidConfigError) as exc:
        raise IncompatibleModelError(f"{directory}: cannot read the saved model ({exc})") from None
    return TrainedModel(
        method=method,
        config=config,
        class_names=list(metadata["class_names"]),
        tensors=tensors,
        temperature=float(metadata.get("temperature", 1.0)),
        metrics=dict(metadata.get("metrics", {})),
        info=dict(metadata.get("info", {})),
    )
