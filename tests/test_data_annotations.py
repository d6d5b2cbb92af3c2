"""Annotation parsing: mmaction2 lists, path,label CSV, SSv2 JSON, the Kinetics-710 union."""
import json

import pytest

from uniformerv2_jax.data import annotations as ann

NAMES = ["abseiling", "air drumming", "answering questions"]


def write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return path


def test_mmaction2_list(tmp_path):
  path = write(tmp_path, "l.txt", "a/x.mp4 0\n\n# comment\nair drumming/y z.mp4 2\n")
  entries, skipped = ann.parse_list(path, NAMES, "/videos")
  assert [(e.path, e.label, e.name) for e in entries] == [
      ("/videos/a/x.mp4", 0, "a/x.mp4"),
      ("/videos/air drumming/y z.mp4", 2, "air drumming/y z.mp4")]
  assert skipped == []


def test_original_csv_with_header_names_and_extra_columns(tmp_path):
  path = write(tmp_path, "l.csv", "path,label\nv1.mp4,1\nv2.mp4,answering questions,3,0\n"
                                  "v3.mp4,air_drumming\n")
  entries, _ = ann.parse_list(path, NAMES, tmp_path)
  assert [(e.name, e.label) for e in entries] == [("v1.mp4", 1), ("v2.mp4", 2), ("v3.mp4", 1)]


def test_a_class_name_beats_another_class_s_underscore_alias(tmp_path):
  """Names are also matched with '_' read as ' ' (mmaction2 folder names); a class literally
  named like another's alias keeps its own lines."""
  path = write(tmp_path, "l.csv", "v0.mp4,a b\nv1.mp4,a_b\nv2.mp4,c d\n")
  entries, _ = ann.parse_list(path, ["a b", "a_b", "c_d"])
  assert [e.label for e in entries] == [0, 1, 2]


def test_the_official_kinetics_csv_is_named_as_such(tmp_path):
  path = write(tmp_path, "train.csv", "label,youtube_id,time_start,time_end,split\n"
                                      "abseiling,-3B32lodo2M,59,69,train\n")
  with pytest.raises(ann.AnnotationError, match=r"train.csv is the official Kinetics CSV .* "
                     r"which names no video files: give a list"):
    ann.parse_list(path, NAMES)


@pytest.mark.parametrize("line", ["v.mp4 3", "v.mp4 -1", "v.mp4 juggling"])
def test_unknown_label_names_file_and_line(tmp_path, line):
  path = write(tmp_path, "l.txt", f"ok.mp4 0\n{line}\n")
  with pytest.raises(ann.AnnotationError, match=r"l.txt:2: unknown label") as err:
    ann.parse_list(path, NAMES)
  assert "on_unknown_label='skip'" in str(err.value)
  entries, skipped = ann.parse_list(path, NAMES, on_unknown="skip")
  assert [e.name for e in entries] == ["ok.mp4"] and skipped[0][0] == "v.mp4"


def test_multilabel_or_rawframe_lines_are_refused(tmp_path):
  path = write(tmp_path, "l.txt", "frames/v 300 1\n")
  with pytest.raises(ann.AnnotationError, match=r"l.txt:1: more than one number"):
    ann.parse_list(path, NAMES)


def test_missing_files_are_named(tmp_path):
  with pytest.raises(ann.AnnotationError, match="annotation file not found"):
    ann.parse_list(tmp_path / "nope.txt", NAMES)
  with pytest.raises(ann.AnnotationError, match=r"class-name file .*nope.txt: no such file"):
    ann.load_class_names(str(tmp_path / "nope.txt"))


def test_byte_order_marks_are_not_part_of_the_first_name(tmp_path):
  """Editors on Windows start UTF-8 files with a BOM: it must not glue onto the first path,
  which then reads as missing, nor onto the first class name."""
  (tmp_path / "l.txt").write_text("\ufeffa/x.mp4 0\nb.mp4 1\n", encoding="utf-8")
  entries, _ = ann.parse_list(tmp_path / "l.txt", NAMES, "/videos")
  assert [e.path for e in entries] == ["/videos/a/x.mp4", "/videos/b.mp4"]
  (tmp_path / "c.csv").write_text("\ufeffpath,label\nv1.mp4,1\n", encoding="utf-8")
  assert [e.name for e in ann.parse_list(tmp_path / "c.csv", NAMES)[0]] == ["v1.mp4"]
  (tmp_path / "names.txt").write_text("\ufeff" + "\n".join(NAMES) + "\n", encoding="utf-8")
  assert ann.load_class_names(str(tmp_path / "names.txt")) == NAMES


def test_class_files_whose_lines_are_not_the_class_ids_are_named(tmp_path):
  dup = write(tmp_path, "dup.txt", "a\nb\na\nc\nb\n")
  with pytest.raises(ann.AnnotationError, match=r"dup.txt.* are not unique: 'a' \(lines 1 and 3\), "
                     r"'b' \(lines 2 and 5\)"):
    ann.load_class_names(str(dup))
  blank = write(tmp_path, "blank.txt", "a\n\nb\n\n")
  with pytest.raises(ann.AnnotationError, match=r"blank.txt.*: line 2 is blank; class ids are "
                     r"line numbers"):
    ann.load_class_names(str(blank))
  assert ann.load_class_names(str(write(tmp_path, "ok.txt", "a\nb\n\n"))) == ["a", "b"]
  with pytest.raises(ann.AnnotationError, match=r"k401: no such file \(nor a packaged list: "
                     r"k400\|k600"):
    ann.load_class_names("k401")


def test_empty_and_binary_files_are_named(tmp_path):
  """A list with no entries, or a binary file given as a list or class names: one message
  naming the file (not TFDS's "no examples were yielded" or a bare codec error)."""
  from uniformerv2_jax import heads
  empty = write(tmp_path, "empty.txt", "\n  \n# only a comment\n")
  with pytest.raises(ann.AnnotationError, match=r"empty.txt: no entries; expected one video"):
    ann.parse_list(empty, NAMES)
  binary = tmp_path / "weights.pth"
  binary.write_bytes(bytes(range(256)) * 4)
  with pytest.raises(ann.AnnotationError, match=r"weights.pth: not a text annotation list"):
    ann.parse_list(binary, NAMES)
  with pytest.raises(ann.AnnotationError, match=r"class-name file .*weights.pth: not a text "
                     r"file of class names"):
    ann.load_class_names(str(binary))
  with pytest.raises(ValueError, match=r"class-name file .*weights.pth: not a text file"):
    heads.read_class_names_file(str(binary))
  with pytest.raises(ValueError, match=r"class-name file .*nope.txt: no such file"):
    heads.read_class_names_file(str(tmp_path / "nope.txt"))


def test_packaged_label_maps():
  assert len(ann.load_class_names("k400")) == 400
  assert len(ann.load_class_names("k710")) == 710
  assert len(ann.load_class_names("sthv2")) == 174
  assert len(ann.load_class_names("mit")) == 339
  k600 = ann.load_index_map("k600")
  assert sorted(k600) == sorted(set(k600)) and max(k600) < 710


def test_ssv2_json(tmp_path):
  names = ann.load_class_names("sthv2")
  template = names[5].replace("something", "[something]", 1)
  items = [{"id": "11", "label": "x", "template": template, "placeholders": []},
           {"id": "12", "label": "y", "template": "Juggling [something]", "placeholders": []}]
  path = write(tmp_path, "train.json", json.dumps(items))
  with pytest.raises(ann.AnnotationError, match="id 12.*unknown template"):
    ann.parse_ssv2_json(path, names, "/v")
  entries, skipped = ann.parse_ssv2_json(path, names, "/v", on_unknown="skip")
  assert [(e.path, e.label) for e in entries] == [("/v/11.webm", 5)]
  assert skipped == [("12.webm", "unknown label 'Juggling something'")]


def test_kinetics_youtube_id():
  assert ann.kinetics_id("abseiling/-3B32lodo2M_000059_000069.mp4") == "-3B32lodo2M"
  assert ann.kinetics_id("a_b_c_d_e_f_000001_000011.mp4") == "a_b_c_d_e_f"
  assert ann.kinetics_id("plainname.mp4") == "plainname"
  # bare ids (mmaction2's K400 validation videos), also those that look like id_start_end
  assert ann.kinetics_id("videos_val/jf7RDuUTrsQ.mp4") == "jf7RDuUTrsQ"
  assert ann.kinetics_id("videos_val/x_12_345678.mp4") == "x_12_345678"
  assert ann.kinetics_id("x_12_345678_000001_000011.mp4") == "x_12_345678"


def test_kinetics710_union_dedups_drops_heldout_and_maps_labels(tmp_path):
  k400, k600 = ann.load_index_map("k400"), ann.load_index_map("k600")
  l400 = write(tmp_path, "k400.txt", "AAAAAAAAAAA_000001_000011.mp4 3\n"
                                     "BBBBBBBBBBB_000001_000011.mp4 7\n")
  l600 = write(tmp_path, "k600.txt", "AAAAAAAAAAA_000001_000011.mp4 3\n"
                                     "CCCCCCCCCCC_000005_000015.mp4 10\n"
                                     "DDDDDDDDDDD_000005_000015.mp4 11\n")
  e400, _ = ann.parse_list(l400, ann.load_class_names("k400"), label_map=k400)
  e600, _ = ann.parse_list(l600, ann.load_class_names("k600"), label_map=k600)
  heldout = write(tmp_path, "val.csv", "label,youtube_id,time_start,time_end,split\n"
                                       "x,DDDDDDDDDDD,5,15,val\n")
  entries, dropped = ann.kinetics710_entries([e400, e600], ann.read_ids(heldout))
  assert [(ann.kinetics_id(e.name), e.label) for e in entries] == [
      ("AAAAAAAAAAA", k400[3]), ("BBBBBBBBBBB", k400[7]), ("CCCCCCCCCCC", k600[10])]
  assert dropped == {"duplicate": 1, "heldout": 1}
  # class ids really change meaning through the map: K600 id 10 is the same name in K710
  assert ann.load_class_names("k710")[k600[10]].lower() == \
      ann.load_class_names("k600")[10].lower()
