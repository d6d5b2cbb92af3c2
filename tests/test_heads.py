"""K710 -> K400/K600/K700 heads: index maps and class names with aliases."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from uniformerv2_jax import heads

MAPS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "uniformerv2_jax", "label_maps")


def names(dataset):
  with open(os.path.join(MAPS, f"label_map_{dataset}.txt")) as f:
    return [line.rstrip("\n") for line in f]


def raw_map(dataset):
  with open(os.path.join(MAPS, f"map_{dataset}.json")) as f:
    return json.load(f)


def head_710(width=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"backbone": {"x": np.ones(3)},
          "head": {"norm": {"scale": np.ones(width)},
                   "fc": {"kernel": rng.normal(size=(width, 710)).astype(np.float32),
                          "bias": rng.normal(size=(710,)).astype(np.float32)}}}


@pytest.mark.parametrize("dataset,classes", [("k400", 400), ("k600", 600), ("k700", 700)])
def test_remap_gathers_rows(dataset, classes):
  tree = head_710()
  out = heads.remap_head(tree, dataset)
  index = raw_map(dataset)
  assert out["head"]["fc"]["kernel"].shape == (16, classes)
  for i in (0, 1, classes // 2, classes - 1):
    # torch weight row i of the new head = row index[i] of the K710 head
    np.testing.assert_array_equal(out["head"]["fc"]["kernel"][:, i],
                                  tree["head"]["fc"]["kernel"][:, index[i]])
    assert out["head"]["fc"]["bias"][i] == tree["head"]["fc"]["bias"][index[i]]
  assert out["backbone"] is tree["backbone"]  # nothing else touched
  # jax arrays work the same
  jtree = {"head": {"fc": {k: jnp.asarray(v) for k, v in tree["head"]["fc"].items()}}}
  np.testing.assert_array_equal(heads.remap_head(jtree, dataset)["head"]["fc"]["bias"],
                                out["head"]["fc"]["bias"])


def test_k400_map_is_identity_prefix():
  np.testing.assert_array_equal(heads.load_index_map("k400"), np.arange(400))
  np.testing.assert_array_equal(heads.load_index_map(os.path.join(MAPS, "map_k600.json")),
                                raw_map("k600"))


@pytest.mark.parametrize("dataset", ["k400", "k600", "k700"])
def test_names_with_aliases_reproduce_the_published_maps(dataset):
  got = heads.index_map_from_names(names("k710"), names(dataset))
  np.testing.assert_array_equal(got, raw_map(dataset))


def test_plain_names_are_not_enough():
  k710 = names("k710")
  assert "balloon blowing" in names("k400") and "balloon blowing" not in k710
  i = heads.index_map_from_names(k710, ["balloon blowing", "dying hair"])
  assert [k710[j] for j in i] == ["inflating balloons", "dyeing hair"]
  j = heads.index_map_from_names(k710, ["passing american football (not in game)"])
  assert k710[j[0]] == "passing American football (not in game)"


def test_errors_are_clear():
  with pytest.raises(ValueError, match="not in the source head"):
    heads.index_map_from_names(names("k710"), ["juggling chainsaws underwater"])
  with pytest.raises(ValueError, match="does not fit a 10-way head"):
    heads.remap_head({"head": {"fc": {"kernel": np.zeros((4, 10)), "bias": np.zeros(10)}}},
                     "k400")
  with pytest.raises(ValueError, match="no such file"):
    heads.load_index_map("k999")


def test_class_files_read_alike_everywhere(tmp_path):
  """convert --class-names, predict and model directories read a class file as data.build does:
  a byte-order mark and surrounding spaces are not part of a name; a blank line before the last
  name or a repeated name is refused (line i is class i: skipping it would shift the ids)."""
  from uniformerv2_jax.data import annotations as ann
  ok = tmp_path / "ok.txt"
  ok.write_text("\ufeffabseiling \n air drumming\n\n", encoding="utf-8")
  assert heads.read_class_names_file(ok) == ann.load_class_names(str(ok)) == [
      "abseiling", "air drumming"]
  for name, text, error in (("blank.txt", "a\n\nb\n", r"line 2 is blank"),
                            ("twice.txt", "a\nb\na\n", r"not unique: 'a' \(lines 1 and 3\)")):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=rf"{name}.*{error}"):
      heads.read_class_names_file(tmp_path / name)
    with pytest.raises(ann.AnnotationError, match=rf"{name}.*{error}"):
      ann.load_class_names(str(tmp_path / name))
