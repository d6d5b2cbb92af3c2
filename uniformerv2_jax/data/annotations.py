"""Annotation files -> ``(video path, label)`` entries, with errors that point at file:line.

Formats:
* mmaction2 video lists: ``path label`` per line (whitespace; spaces inside the path allowed);
* the original repository's CSV: ``path,label`` (extra columns ignored, optional header);
* Moments in Time CSV (``path,class name,...``): a label may be a class *name* instead of an id;
* Something-Something V2 JSON (``[{"id": ..., "template": "Putting [something] ..."}]``);
* Kinetics-710: the union built by :func:`kinetics710_entries`.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Iterable, Sequence

__all__ = ["Entry", "AnnotationError", "load_class_names", "load_index_map",
           "parse_list", "parse_ssv2_json", "kinetics_id", "read_ids", "kinetics710_entries"]

PACKAGED_LABEL_MAPS = ("k400", "k600", "k700", "k710", "mit", "sthv2")


class AnnotationError(ValueError):
  """An annotation or class-name file cannot be used as it is."""


@dataclasses.dataclass(frozen=True)
class Entry:
  path: str    # where the video file is
  label: int   # class id in the dataset's class list
  name: str    # the video as the annotation names it (relative path or id)


def load_class_names(source) -> list[str]:
  """Class names from a list/tuple, a packaged map name (e.g. ``"k400"``) or a file (one a line),
  checked as :func:`uniformerv2_jax.heads.parse_class_names` checks them (stripped, no blank
  line before the last name, no name twice)."""
  from uniformerv2_jax import heads
  try:
    if isinstance(source, (list, tuple)):
      return heads.parse_class_names("\n".join(str(n) for n in source), "class_names")
    return heads.read_class_names_file(source)
  except ValueError as e:
    raise AnnotationError(str(e)) from None


def load_index_map(name: str) -> list[int]:
  """K710 head row of each class of k400/k600/k700 (``map_<name>.json``, read and checked by
  :func:`uniformerv2_jax.heads.load_index_map`)."""
  from uniformerv2_jax import heads
  return [int(i) for i in heads.load_index_map(name)]


def _split_line(line: str, fmt: str) -> tuple[str, str]:
  if fmt == "csv":
    row = next(csv.reader([line]))
    if len(row) < 2:
      raise ValueError("expected 'path,label'")
    return row[0].strip(), row[1].strip()
  parts = line.rsplit(None, 1)
  if len(parts) != 2:
    raise ValueError("expected 'path label'")
  if parts[0].rsplit(None, 1)[-1].lstrip("-").isdigit() and len(parts[0].split()) > 1:
    raise ValueError("more than one number after the path: multi-label or rawframe lists "
                     "('path num_frames label') are not supported; give 'path label'")
  return parts[0], parts[1]


def _resolve_label(token: str, names: Sequence[str], index: dict) -> int | None:
  if token.lstrip("-").isdigit():
    value = int(token)
    return value if 0 <= value < len(names) else None
  return index.get(token, index.get(token.replace("_", " ")))


def parse_list(path, class_names: Sequence[str], video_root="", *, fmt: str = "auto",
               on_unknown: str = "error", label_map: Sequence[int] | None = None):
  """Parse an mmaction2 list or a ``path,label`` CSV into ``(entries, skipped)``.

  Labels are ids or names of ``class_names``; ``label_map`` then maps those ids to the built
  dataset's ids (Kinetics -> K710).
  Unknown labels raise :class:`AnnotationError` listing them (``on_unknown="error"``) or
  are returned in ``skipped`` as ``(name, reason)`` (``on_unknown="skip"``).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise AnnotationError(f"annotation file not found: {path}")
  try:
    with open(path, encoding="utf-8-sig") as f:
      lines = [(i + 1, ln.strip()) for i, ln in enumerate(f)]
  except UnicodeDecodeError as e:
    raise AnnotationError(f"{path}: not a text annotation list ({e})") from None
  lines = [(n, ln) for n, ln in lines if ln and not ln.startswith("#")]
  if not lines:
    raise AnnotationError(f"{path}: no entries; expected one video a line, mmaction2's "
                          "`path label` or `path,label`")
  if fmt == "auto":
    fmt = "csv" if lines and "," in lines[0][1] else "list"
  if fmt == "csv" and "youtube_id" in next(csv.reader([lines[0][1]])):
    raise AnnotationError(
        f"{path} is the official Kinetics CSV (label,youtube_id,time_start,time_end,...), "
        "which names no video files: give a list of the files you downloaded, one "
        "`path label` a line (mmaction2's kinetics<N>_<split>_list_videos.txt)")
  index = {n.replace("_", " "): i for i, n in enumerate(class_names)}
  index.update({n: i for i, n in enumerate(class_names)})  # a name beats another's alias
  entries, skipped, errors = [], [], []
  for k, (lineno, line) in enumerate(lines):
    try:
      name, token = _split_line(line, fmt)
    except ValueError as e:
      raise AnnotationError(f"{path}:{lineno}: {e}: {line!r}") from None
    if k == 0 and token.lower() in ("label", "class", "label_id") and token not in index:
      continue  # CSV header
    label = _resolve_label(token, class_names, index)
    if label is not None and label_map is not None:
      label = label_map[label]
    if label is None:
      errors.append(f"{path}:{lineno}: unknown label {token!r} "
                    f"(expected 0..{len(class_names) - 1} or a class name)")
      skipped.append((name, f"unknown label {token!r}"))
      continue
    entries.append(Entry(os.path.join(os.fspath(video_root), name), label, name))
  _report_unknown(errors, on_unknown)
  return entries, skipped


def _report_unknown(errors: list[str], on_unknown: str) -> None:
  if errors and on_unknown == "error":
    shown = "\n  ".join(errors[:10])
    raise AnnotationError(f"{len(errors)} annotation line(s) have an unknown label:\n  {shown}\n"
                          "Fix the annotations or the class-name file, or build with "
                          "--on_unknown_label skip (on_unknown_label='skip') to leave those "
                          "videos out (listed in the skip report).")


def parse_ssv2_json(path, class_names: Sequence[str], video_root="", *, ext: str = ".webm",
                    on_unknown: str = "error"):
  """Something-Something V2 ``something-something-v2-{train,validation}.json`` entries.

  The label is the template without brackets, looked up in ``class_names``.
  """
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8-sig") as f:
      items = json.load(f)
  except FileNotFoundError:
    raise AnnotationError(f"annotation file not found: {path}") from None
  except json.JSONDecodeError as e:
    raise AnnotationError(f"{path}: not valid JSON ({e})") from None
  index = {n: i for i, n in enumerate(class_names)}
  entries, skipped, errors = [], [], []
  for k, item in enumerate(items):
    if "template" not in item or "id" not in item:
      raise AnnotationError(f"{path}: item {k} lacks 'id' or 'template' (test-set JSONs "
                            "carry no labels and cannot be built)")
    template = item["template"].replace("[", "").replace("]", "")
    label = index.get(template)
    name = f"{item['id']}{ext}"
    if label is None:
      errors.append(f"{path}: item {k} (id {item['id']}): unknown template {template!r}")
      skipped.append((name, f"unknown label {template!r}"))
      continue
    entries.append(Entry(os.path.join(os.fspath(video_root), name), label, name))
  _report_unknown(errors, on_unknown)
  return entries, skipped


def kinetics_id(name: str) -> str:
  """YouTube id of a Kinetics clip name such as ``abseiling/-3B32lodo2M_000059_000069.mp4``
  or a bare ``jf7RDuUTrsQ.mp4`` (11 characters: a YouTube id, even one shaped like
  ``x_12_345678``)."""
  stem = os.path.splitext(os.path.basename(name))[0]
  if len(stem) == 11:
    return stem
  parts = stem.rsplit("_", 2)
  if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
    return parts[0]
  return stem


def read_ids(path) -> set[str]:
  """YouTube ids in a Kinetics list: mmaction2 list, path CSV or official ``youtube_id`` CSV."""
  path = os.fspath(path)
  with open(path, encoding="utf-8-sig") as f:
    rows = [r for r in csv.reader(f) if r]
  if rows and "youtube_id" in rows[0]:
    col = rows[0].index("youtube_id")
    return {r[col] for r in rows[1:] if len(r) > col}
  if rows and len(rows[0]) > 1:
    return {kinetics_id(r[0]) for r in rows}
  return {kinetics_id(r[0].rsplit(None, 1)[0] if len(r[0].split()) > 1 else r[0]) for r in rows}


def kinetics710_entries(train_sources: Iterable[list[Entry]], heldout_ids: set[str]):
  """Union of Kinetics training sets already mapped to K710 ids (in the given order).

  Keeps the first occurrence of each YouTube id and drops every id in ``heldout_ids``
  (validation/test ids of K400/K600/K700). Returns ``(entries, dropped_counts)``.
  """
  seen, out = set(), []
  dropped = {"duplicate": 0, "heldout": 0}
  for entries in train_sources:
    for e in entries:
      vid = kinetics_id(e.name)
      if vid in heldout_ids:
        dropped["heldout"] += 1
      elif vid in seen:
        dropped["duplicate"] += 1
      else:
        seen.add(vid)
        out.append(e)
  return out, dropped
