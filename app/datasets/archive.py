"""Reading an uploaded zip safely: structure first (cheap), then every image decoded.

Two layouts are accepted:
  class folders   <any/prefix/>cat/001.png, <any/prefix/>dog/002.jpg
                  label_from "parent" (default): each image's own folder
                  label_from "top": the first folder below those that wrap every image,
                  so cat/2019/001.png is a "cat" (torchvision's ImageFolder reads so)
  labels.csv      labels.csv with a `filename,label` header, filenames relative to it
Nothing is extracted by the archive's own names: images are copied to files named by
item id, so a hostile name cannot write outside the staging directory.
"""

from __future__ import annotations

import csv
import io
import stat
import time
import zipfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import IO

from app.errors import ApiError
from lqf_core.data import IMAGE_SUFFIXES, check_image
from state.records import ManifestItem

MAX_LABEL_LENGTH = 200
_LABELS_CSV = "labels.csv"
# Top-level folders that split one dataset rather than name classes (train/cat, test/cat).
_SPLIT_FOLDERS = {"train", "training", "val", "valid", "validation", "test", "testing", "dev",
                  "eval"}


class LabelFrom(StrEnum):
    """Which folder names an image's class in a class-folder archive."""

    PARENT = "parent"  # the folder the image is in
    TOP = "top"  # the first folder below the ones that wrap every image


@dataclass(frozen=True)
class ArchiveEntry:
    name: str  # path inside the archive, as the user wrote it
    label: str
    info: zipfile.ZipInfo


@dataclass(frozen=True)
class Limits:
    max_files: int
    max_uncompressed_bytes: int


def open_zip(fileobj: IO[bytes]) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(fileobj)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        raise ApiError(400, f"the upload is not a readable zip archive ({exc})",
                       "not_a_zip") from None


def _is_unsafe(info: zipfile.ZipInfo) -> bool:
    name = info.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
        return True
    return stat.S_ISLNK(info.external_attr >> 16)


def _skipped(name: str) -> bool:
    """macOS resource forks, hidden files (.DS_Store) and folders are not data."""
    parts = PurePosixPath(name).parts
    return name.endswith("/") or any(p.startswith(".") or p == "__MACOSX" for p in parts)


def scan(zf: zipfile.ZipFile, limits: Limits, label_from: LabelFrom = LabelFrom.PARENT
         ) -> tuple[list[ArchiveEntry], list[str], list[str]]:
    """Check the archive's structure and label every image -> (entries, ignored names,
    warnings). `label_from` applies to class folders (a labels.csv names every label)."""
    infos = [i for i in zf.infolist() if not i.is_dir()]
    unsafe = [i.filename for i in infos if _is_unsafe(i)]
    if unsafe:
        raise ApiError(400, f"archive entry {unsafe[0]!r} has a path that escapes the archive "
                            "(absolute, '..' or a link); nothing was stored", "unsafe_path")
    if len(infos) > limits.max_files:
        raise ApiError(413, f"archive holds {len(infos)} files, the limit is {limits.max_files}",
                       "too_many_files")
    total = sum(i.file_size for i in infos)
    if total > limits.max_uncompressed_bytes:
        raise ApiError(413, f"archive expands to {total} bytes, the limit is "
                            f"{limits.max_uncompressed_bytes}", "too_large_uncompressed")
    infos = [i for i in infos if not _skipped(i.filename)]
    csvs = [i for i in infos if PurePosixPath(i.filename).name.lower() == _LABELS_CSV]
    images = [i for i in infos if PurePosixPath(i.filename).suffix.lower() in IMAGE_SUFFIXES]
    ignored = sorted(i.filename for i in infos if i not in images and i not in csvs)
    if len(csvs) > 1:
        raise ApiError(422, f"archive holds {len(csvs)} labels.csv files, expected at most one",
                       "invalid_archive")
    warnings: list[str] = []  # a labels.csv names its labels: no folder warnings
    if csvs:
        entries = _from_csv(zf, csvs[0], images)
    else:
        entries, warnings = _from_folders(images, label_from)
    if not entries:
        raise ApiError(422, "archive holds no images (accepted: "
                            f"{', '.join(IMAGE_SUFFIXES)})", "no_images")
    return entries, ignored, warnings


def _check_label(label: str, where: str) -> str:
    label = label.strip()
    if not label:
        raise ApiError(422, f"{where}: empty label", "invalid_label")
    if len(label) > MAX_LABEL_LENGTH:
        raise ApiError(422, f"{where}: label longer than {MAX_LABEL_LENGTH} characters",
                       "invalid_label")
    return label


def _folders(name: str) -> tuple[str, ...]:
    return PurePosixPath(name).parts[:-1]


def _wrapper(folder_lists: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The folders every image is inside (the longest common prefix)."""
    first = folder_lists[0]
    depth = min(len(f) for f in folder_lists)
    for i in range(depth):
        if any(f[i] != first[i] for f in folder_lists):
            return first[:i]
    return first[:depth]


def _from_folders(images: list[zipfile.ZipInfo], label_from: LabelFrom
                  ) -> tuple[list[ArchiveEntry], list[str]]:
    """Label each image by its folders -> (entries, warnings)."""
    folder_lists = [_folders(i.filename) for i in images]
    for info, folders in zip(images, folder_lists, strict=True):
        if not folders:
            raise ApiError(422, f"image {info.filename!r} is at the archive root: put each "
                                "class in its own folder, or add a labels.csv", "missing_label")
    wrapper = _wrapper(folder_lists) if images else ()
    one_folder = all(folders == wrapper for folders in folder_lists)
    entries = []
    for info, folders in zip(images, folder_lists, strict=True):
        if label_from == LabelFrom.PARENT:
            label = folders[-1]
        elif len(folders) > len(wrapper):
            label = folders[len(wrapper)]
        elif one_folder:
            label = folders[-1]  # every image in one folder: that folder is the class
        else:
            raise ApiError(422, f"image {info.filename!r} is beside the class folders, not in "
                                "one (label_from=top: the class is the first folder below "
                                f"{'/'.join(wrapper)!r})", "missing_label")
        entries.append(ArchiveEntry(info.filename, _check_label(label, info.filename), info))
    warnings = (_folder_warnings(entries, folder_lists, wrapper)
                if label_from == LabelFrom.PARENT else [])
    return entries, warnings


def _folder_warnings(entries: list[ArchiveEntry], folder_lists: list[tuple[str, ...]],
                     wrapper: tuple[str, ...]) -> list[str]:
    """Parent-folder labels that look like subfolders of the real classes: one label found
    under several top-level folders (cats/2019, dogs/2019), unless those folders are
    splits (train/cat, test/cat). Stored as labelled; the warning says how to relabel."""
    tops: dict[str, set[str]] = {}
    for e, folders in zip(entries, folder_lists, strict=True):
        if len(folders) > len(wrapper) + 1:  # a folder between the top and the label's
            tops.setdefault(e.label, set()).add(folders[len(wrapper)])
    spread = {label: sorted(t) for label, t in tops.items() if len(t) > 1
              and not all(name.casefold() in _SPLIT_FOLDERS for name in t)}
    if not spread:
        return []
    shown = sorted(spread)[:3]
    examples = "; ".join(f"{label!r} under {', '.join(repr(t) for t in spread[label][:3])}"
                         for label in shown)
    more = f" (and {len(spread) - len(shown)} more)" if len(spread) > len(shown) else ""
    return [f"labels come from each image's own folder, and some are found under several "
            f"top-level folders: {examples}{more}. If the top-level folders are the classes, "
            "upload the archive again with label_from=top"]


def _from_csv(zf: zipfile.ZipFile, csv_info: zipfile.ZipInfo,
              images: list[zipfile.ZipInfo]) -> list[ArchiveEntry]:
    base = PurePosixPath(csv_info.filename).parent
    try:
        text = zf.read(csv_info).decode("utf-8-sig")
    except (UnicodeDecodeError, zipfile.BadZipFile, OSError) as exc:
        raise ApiError(422, f"labels.csv is not readable UTF-8 text ({exc})",
                       "invalid_labels_csv") from None
    rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["filename", "label"]:
        raise ApiError(422, "labels.csv must start with the header 'filename,label'",
                       "invalid_labels_csv")
    by_name = {str(PurePosixPath(i.filename)): i for i in images}
    entries, seen, missing = [], set(), []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) < 2:
            raise ApiError(422, f"labels.csv line {line}: expected 'filename,label'",
                           "invalid_labels_csv")
        rel = row[0].strip().replace("\\", "/")
        name = str(base / rel) if str(base) != "." else str(PurePosixPath(rel))
        if name in seen:
            raise ApiError(422, f"labels.csv line {line}: {rel!r} is listed twice",
                           "invalid_labels_csv")
        seen.add(name)
        info = by_name.get(name)
        if info is None:
            missing.append(rel)
            continue
        entries.append(ArchiveEntry(name, _check_label(row[1], f"labels.csv line {line}"), info))
    if missing:
        raise ApiError(422, f"labels.csv names {len(missing)} file(s) that are not images in the "
                            f"archive, e.g. {missing[:3]}", "label_without_image")
    unlabelled = sorted(set(by_name) - seen)
    if unlabelled:
        raise ApiError(422, f"{len(unlabelled)} image(s) have no row in labels.csv, e.g. "
                            f"{unlabelled[:3]}", "image_without_label")
    return entries


def extract(zf: zipfile.ZipFile, entries: list[ArchiveEntry], dest: Path,
            first_id: int, deadline: float | None = None) -> list[ManifestItem]:
    """Decode-check every image and copy it to dest/{item id}{suffix} -> manifest items.
    Past `deadline` (time.monotonic()) a 503: the caller drops what was written."""
    dest.mkdir(parents=True, exist_ok=True)
    items = []
    for offset, entry in enumerate(entries):
        if deadline is not None and time.monotonic() > deadline:
            raise ApiError(503, f"checking and storing the archive took too long (stopped "
                                f"after {offset} of {len(entries)} images; "
                                "LQF_UPLOAD_PROCESS_TIMEOUT_S); nothing was stored: split it "
                                "into smaller archives", "upload_timeout")
        try:
            data = zf.read(entry.info)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ApiError(400, f"{entry.name}: corrupt archive member ({exc})",
                           "not_a_zip") from None
        check_image(data, name=entry.name)  # raises InvalidDataError -> 422
        item_id = first_id + offset
        suffix = PurePosixPath(entry.name).suffix.lower()
        (dest / f"{item_id}{suffix}").write_bytes(data)
        items.append(ManifestItem(id=item_id, label=entry.label, filename=entry.name,
                                  file=f"images/{item_id}{suffix}"))
    return items
