"""Label Studio's formats, as both the api (its ML-backend protocol) and the workers (the
training jobs that read a project's annotations) read them: the labeling config, task
data and annotation results. Plain parsing, no I/O."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any


class LabelStudioFormatError(ValueError):
    """Something Label Studio sent is not what an image classifier can use."""


@dataclass(frozen=True)
class ChoicesControl:
    """A `<Choices name=... toName=...>` control and the image it labels."""

    from_name: str
    to_name: str
    data_key: str  # the task data field holding the image URL ("$image" -> "image")
    choices: tuple[str, ...]


def parse_label_config(label_config: str) -> ChoicesControl:
    """The first `<Choices>` control that labels an `<Image>`."""
    if not label_config or not label_config.strip():
        raise LabelStudioFormatError("label_config is empty: send the project's labeling "
                                     "config")
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError as exc:
        raise LabelStudioFormatError(f"label_config is not valid XML ({exc})") from None
    images = {el.get("name"): el for el in root.iter() if el.tag == "Image" and el.get("name")}
    for control in root.iter("Choices"):
        name, target = control.get("name"), control.get("toName")
        image = images.get(target)
        if not name or not target or image is None:
            continue
        value = image.get("value", "")
        if not value.startswith("$") or len(value) < 2:
            raise LabelStudioFormatError(
                f"<Image name={target!r}> needs value=\"$field\" naming the task data "
                f"field, got {value!r}")
        choices = tuple(c.get("value") or c.get("alias") or "" for c in control.iter("Choice"))
        return ChoicesControl(name, target, value[1:], tuple(c for c in choices if c))
    raise LabelStudioFormatError("label_config has no <Choices> control whose toName is an "
                                 "<Image>: this backend classifies images")


def choices_prediction(label: str, score: float, control: ChoicesControl, version: str
                       ) -> dict[str, Any]:
    """One prediction as Label Studio stores it: a `choices` result with its score."""
    return {"result": [{"from_name": control.from_name, "to_name": control.to_name,
                        "type": "choices", "value": {"choices": [label]}, "score": score}],
            "score": score, "model_version": version}


def project_id(value: Any) -> int | None:
    """Label Studio names its project "2.1795762303" in /setup and {"id": 2} in webhooks."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    head = str(value or "").split(".", 1)[0]
    return int(head) if head.isdigit() else None


def task_image(task: Any, control: ChoicesControl) -> str:
    """The image URL or data URI of a task."""
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        raise LabelStudioFormatError(f"task {_task_name(task)} has no 'data' object")
    source = task["data"].get(control.data_key)
    if not isinstance(source, str) or not source:
        raise LabelStudioFormatError(
            f"task {_task_name(task)}: data field {control.data_key!r} (from the <Image> "
            "value) is missing or not a string")
    return source


def annotated_label(task: dict[str, Any], control: ChoicesControl) -> tuple[int, str] | None:
    """(annotation id, label) of the task's newest annotation that was not cancelled and
    chose one class in `control`; None if it has none."""
    annotations = [a for a in task.get("annotations") or []
                   if isinstance(a, dict) and not a.get("was_cancelled")]
    for annotation in sorted(annotations, key=lambda a: (str(a.get("updated_at") or ""),
                                                         int(a.get("id") or 0)), reverse=True):
        for item in annotation.get("result") or []:
            if (isinstance(item, dict) and item.get("from_name") == control.from_name
                    and item.get("type") == "choices"):
                chosen = (item.get("value") or {}).get("choices") or []
                if len(chosen) == 1 and isinstance(chosen[0], str):
                    return int(annotation.get("id") or 0), chosen[0]
    return None


def _task_name(task: Any) -> str:
    return str(task.get("id", "?")) if isinstance(task, dict) else "?"
