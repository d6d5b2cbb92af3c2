"""uniformerv2_jax.storage on local paths (tests/test_object_store.py covers gs:// end to end)."""

import os

import pytest

from uniformerv2_jax import storage


def test_absolute_keeps_urls_and_anchors_local_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.absolute("gs://bucket/runs/x/") == "gs://bucket/runs/x"
  assert storage.absolute("runs/x") == str(tmp_path / "runs" / "x")
  assert storage.is_url("gs://b/x") and not storage.is_url("/data/gs:/x")


def test_write_text_never_leaves_a_partial_file(tmp_path, monkeypatch):
  path = tmp_path / "summary.json"
  storage.write_text(path, "old\n")

  def fail(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", fail)
  with pytest.raises(OSError, match="disk full"):
    storage.write_text(path, "new\n")
  assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["summary.json"]


def test_find_dirs_containing_stops_at_a_match(tmp_path):
  for d in ("k400/1.0.0", "mine/sub/1.0.0", "k400/1.0.0/inner", "deep/a/b/c/d"):
    (tmp_path / d).mkdir(parents=True)
  for d in ("k400/1.0.0", "mine/sub/1.0.0", "k400/1.0.0/inner", "deep/a/b/c/d"):
    (tmp_path / d / "dataset_info.json").write_text("{}")
  found = storage.find_dirs_containing(tmp_path, "dataset_info.json", max_depth=4)
  # k400/1.0.0/inner lies inside a match; deep/a/b/c/d is 5 levels down
  assert found == [str(tmp_path / "k400" / "1.0.0"), str(tmp_path / "mine" / "sub" / "1.0.0")]
  assert storage.find_dirs_containing(tmp_path / "k400" / "1.0.0", "dataset_info.json") == \
      [str(tmp_path / "k400" / "1.0.0")]
  assert storage.listdir(tmp_path / "missing") == []
