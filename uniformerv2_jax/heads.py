"""Classification heads between label spaces (Kinetics-710 -> K400/K600/K700).

A 710-way head becomes a K400/K600/K700 head by gathering rows of the PyTorch weight
(columns of our (C, classes) kernel) and bias with the index maps published with
mmaction2 (`label_maps/map_k*.json`: entry i is the K710 row of class i). Mapping by
class names needs aliases: 17 Kinetics names differ from the K710 name they map to
(e.g. K400 "balloon blowing" is K710 "inflating balloons"); the aliases are read
off those same maps, so `index_map_from_names` agrees with the published maps.
"""

from __future__ import annotations

import functools
import json
import os
from importlib import resources
from typing import Any, Mapping, Sequence

import numpy as np

BUILTIN = ("k400", "k600", "k700")


def _label_maps_dir():
  return resources.files("uniformerv2_jax") / "label_maps"


def parse_class_names(text: str, source: str = "the class list") -> list[str]:
  """A class list file's text -> names: line i is class i, stripped (a byte-order mark too);
  trailing blank lines are dropped. A blank line before the last name (it would shift every
  id after it), a repeated name or no name at all raises ValueError naming `source`."""
  names = [line.strip() for line in text.removeprefix("\ufeff").splitlines()]
  while names and not names[-1]:
    names.pop()
  if "" in names:
    raise ValueError(f"class names in {source!r}: line {names.index('') + 1} is blank; class "
                     "ids are line numbers, so remove it (or name the class)")
  seen: dict[str, int] = {}
  twice = [f"{n!r} (lines {seen[n] + 1} and {i + 1})" for i, n in enumerate(names)
           if seen.setdefault(n, i) != i]
  if twice:
    raise ValueError(f"class names in {source!r} are not unique: " + ", ".join(twice[:5]))
  if not names:
    raise ValueError(f"no class names in {source!r}")
  return names


def read_class_names_file(path) -> list[str]:
  """The names in a class list file (local path or gs:// URL), one a line, or of a packaged
  list named as data.build's --classes names them (k400|k600|k700|k710|mit|sthv2)."""
  from uniformerv2_jax import storage
  from uniformerv2_jax.data.annotations import PACKAGED_LABEL_MAPS
  if os.fspath(path) in PACKAGED_LABEL_MAPS:
    return builtin_class_names(os.fspath(path))
  try:
    text = storage.read_text(path)
  except FileNotFoundError:
    raise ValueError(f"class-name file {path}: no such file (nor a packaged list: "
                     f"{'|'.join(PACKAGED_LABEL_MAPS)})") from None
  except (UnicodeDecodeError, IsADirectoryError) as e:
    raise ValueError(f"class-name file {path}: not a text file of class names, one a line "
                     f"({type(e).__name__})") from None
  return parse_class_names(text, os.fspath(path))


def builtin_class_names(name: str) -> list[str]:
  """Class names of "k400"|"k600"|"k700"|"k710"|"mit"|"sthv2" (line i is class i)."""
  path = _label_maps_dir() / f"label_map_{name}.txt"
  if not path.is_file():
    raise ValueError(f"no built-in class list {name!r}")
  return parse_class_names(path.read_text(encoding="utf-8"), name)


def load_index_map(name_or_path: str | os.PathLike | Sequence[int]) -> np.ndarray:
  """"k400"|"k600"|"k700", a JSON file holding a list of ints, or a list -> int array."""
  if not isinstance(name_or_path, (str, os.PathLike)):
    values, where = list(name_or_path), "index map"
  else:
    key = os.fspath(name_or_path)
    stem = builtin_name(key)
    if stem is not None:
      text, where = (_label_maps_dir() / f"map_{stem}.json").read_text(), f"map_{stem}.json"
    elif os.path.isfile(key):
      with open(key) as f:
        text, where = f.read(), key
    else:
      raise ValueError(f"head map {key!r}: no such file; use one of {list(BUILTIN)} or a JSON "
                       "file holding a list of source-head rows")
    try:
      values = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not JSON ({e})") from None
  if (not isinstance(values, list) or not values
      or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)):
    raise ValueError(f"{where}: an index map must be a non-empty JSON list of row numbers >= 0")
  if len(set(values)) != len(values):
    raise ValueError(f"{where}: the index map repeats rows")
  return np.asarray(values, np.int64)


def builtin_name(name_or_path) -> str | None:
  """"k400" for the built-in map "k400" ("map_k400", "map_k400.json", or the packaged file
  itself); None for any other file, a path that does not exist, or a list of rows."""
  if not isinstance(name_or_path, (str, os.PathLike)):
    return None
  key = os.fspath(name_or_path)
  stem = key.lower().removeprefix("map_").removesuffix(".json")
  if stem in BUILTIN and not os.path.isfile(key):  # a folder named k400 does not hide it
    return stem
  base = os.path.basename(key).lower().removeprefix("map_").removesuffix(".json")
  packaged = _label_maps_dir() / f"map_{base}.json"
  if base in BUILTIN and os.path.isfile(key) and os.path.samefile(key, os.fspath(packaged)):
    return base
  return None


def index_map_for(head_map, source_names: Sequence[str] | None = None) -> np.ndarray:
  """The source-head rows `head_map` picks. A built-in map (k400|k600|k700) lists rows of
  the Kinetics-710 order; a source head that names its classes in another order gets its
  rows by name (for the K710 order the two agree). Custom maps are taken as they are."""
  name = builtin_name(head_map)
  if name is None or source_names is None or list(source_names) == builtin_class_names("k710"):
    return load_index_map(head_map)
  try:
    return index_map_from_names(source_names, builtin_class_names(name))
  except ValueError as e:
    raise ValueError(f"head_map {head_map!r} takes {name.upper()}'s classes by name, but the "
                     f"{len(source_names)} classes this head names do not include them all "
                     f"({e})") from None


def remap_head(tree: Mapping[str, Any], index_map) -> dict:
  """Pure weight tree with head.fc (C, S) -> (C, len(map)): target class i = source row map[i].

  Works on numpy or jax arrays (jax arrays stay on their devices).
  """
  idx = np.asarray(load_index_map(index_map) if isinstance(index_map, (str, os.PathLike))
                   else index_map, np.int64)
  fc = tree["head"]["fc"]
  kernel, bias = fc["kernel"], fc["bias"]
  source = kernel.shape[-1]
  if idx.ndim != 1 or idx.size == 0 or idx.min() < 0 or idx.max() >= source:
    raise ValueError(f"index map with rows in [{idx.min()}, {idx.max()}] does not fit a "
                     f"{source}-way head (head.fc.kernel {tuple(kernel.shape)})")
  take = (lambda a, axis: a.take(idx, axis=axis))
  out = dict(tree)
  head = dict(tree["head"])
  head["fc"] = dict(fc, kernel=take(kernel, -1), bias=take(bias, 0))
  out["head"] = head
  return out


@functools.lru_cache(maxsize=1)
def _alias_groups() -> tuple[frozenset[str], ...]:
  """Groups of names that denote one class, read off the built-in K710 index maps."""
  k710 = builtin_class_names("k710")
  parent: dict[str, str] = {}

  def find(a):
    while parent.setdefault(a, a) != a:
      a = parent[a]
    return a

  for name in BUILTIN:
    names, idx = builtin_class_names(name), load_index_map(name)
    for i, row in enumerate(idx):
      a, b = find(names[i]), find(k710[row])
      if a != b:
        parent[a] = b
  groups: dict[str, set[str]] = {}
  for a in parent:
    groups.setdefault(find(a), set()).add(a)
  return tuple(frozenset(g) for g in groups.values() if len(g) > 1)


def aliases(name: str) -> set[str]:
  """Every name that denotes the same class as `name` (itself included)."""
  for group in _alias_groups():
    if name in group:
      return set(group)
  return {name}


def index_map_from_names(source_names: Sequence[str], target_names: Sequence[str]) -> np.ndarray:
  """Row of the source head for each target class, by name (with the Kinetics aliases)."""
  position = {n: i for i, n in enumerate(source_names)}
  if len(position) != len(source_names):
    raise ValueError("source class names contain duplicates")
  out, unknown = [], []
  for name in target_names:
    if name in position:
      out.append(position[name])
      continue
    hits = {position[a] for a in aliases(name) if a in position}
    if len(hits) == 1:
      out.append(hits.pop())
    else:
      unknown.append(name)
  if unknown:
    raise ValueError(f"{len(unknown)} target class name(s) not in the source head's classes "
                     f"(even with the Kinetics aliases): {unknown[:10]}")
  if len(set(out)) != len(out):
    raise ValueError("two target classes map to the same source row")
  return np.asarray(out, np.int64)


def remap_head_by_names(tree: Mapping[str, Any], source_names: Sequence[str],
                        target_names: Sequence[str]) -> dict:
  return remap_head(tree, index_map_from_names(source_names, target_names))
