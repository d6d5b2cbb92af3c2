"""CLIP image tower -> initial UniFormerV2, against the upstream's float64 `backbone_out`."""

import functools
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import convert
from conftest import GOLDEN, golden_case, rel_err, torch_input_to_jax
from convert.clip import convert_clip, inflate_conv1
from uniformerv2_jax import model_config
from uniformerv2_jax.checkpoint import load_pretrained, read_config, restore_weights
from uniformerv2_jax.weights import flatten, weight_shapes

# One worker runs the module (--dist loadgroup), so its module fixtures run once.
pytestmark = pytest.mark.xdist_group("convert_clip")


class _Holder(torch.nn.Module):

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x


def save_torchscript(module, path):
  """``torch.jit.script(module).save(path)``: OpenAI ships CLIP as TorchScript archives, so the
  tests write some; torch 2.13 deprecates ``torch.jit.script`` (its warning is expected here)."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
    torch.jit.script(module).save(str(path))


def torchscript_archive(state_dict, path):
  """A TorchScript archive whose state_dict() is `state_dict` (as OpenAI ships CLIP)."""
  root = _Holder()
  for key, value in state_dict.items():
    *parents, leaf = key.split(".")
    module = root
    for p in parents:
      if not hasattr(module, p):
        module.add_module(p, _Holder())
      module = getattr(module, p)
    module.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
  save_torchscript(root, path)
  return path


class _Tower(torch.nn.Module):
  """What a traced CLIP holds: nested and numbered submodules, float16 and float32 weights,
  a buffer, a parameter viewing part of a shared storage, and non-tensor attributes."""

  def __init__(self):
    super().__init__()
    g = torch.Generator().manual_seed(0)
    self.resblocks = torch.nn.Sequential(*[torch.nn.Linear(4, 3) for _ in range(3)]).half()
    self.ln = torch.nn.LayerNorm(3)
    shared = torch.randn(5, 4, generator=g, dtype=torch.float64)
    self.proj = torch.nn.Parameter(shared[1:4, 1:], requires_grad=False)  # offset, strides
    self.register_buffer("counts", torch.arange(6, dtype=torch.int64).reshape(2, 3))
    self.sizes = [3, 4]
    self.input_resolution = 224

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.ln(self.resblocks(x.half()).float())


def test_torchscript_archive_is_read_without_torch_jit(tmp_path, recwarn):
  """The restricted data.pkl reader gives torch.jit.load's state_dict(), bit for bit, and
  neither runs the archive nor warns (torch.jit.load is deprecated from torch 2.13 on)."""
  from convert.io import load_torch_file
  path = str(tmp_path / "tower.pt")
  save_torchscript(_Tower(), path)
  recwarn.clear()
  got = load_torch_file(path)
  assert not [w for w in recwarn.list if issubclass(w.category, DeprecationWarning)]
  want = dict(torch.jit.load(path).state_dict())
  assert set(got) == set(want) and len(want) == 10
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
  assert got["proj"].dtype == torch.float64 and got["resblocks.2.weight"].dtype == torch.float16


@pytest.fixture(scope="module")
def clip_json(tmp_path_factory):
  import json
  _, cfg = golden_case("tiny_clip")
  path = tmp_path_factory.mktemp("cfg") / "tiny_clip.json"
  path.write_text(json.dumps(cfg))
  return str(path)


@pytest.fixture(scope="module")
def torchscript_clip(tmp_path_factory):
  sd = torch.load(GOLDEN / "tiny_clip_openai.pt", weights_only=True)
  return str(torchscript_archive(sd, tmp_path_factory.mktemp("ts") / "tiny_clip_jit.pt"))


SOURCES = {"openai": "tiny_clip_openai.pt", "openai_fp16": "tiny_clip_openai_fp16.pt",
           "visual": "tiny_clip_visual.pth", "torchscript": None}


@pytest.fixture(scope="module")
def converted(clip_json, torchscript_clip, tmp_path_factory):
  """Each layout converted once (seed 0)."""
  root = tmp_path_factory.mktemp("converted")
  out = {}
  for name, file in SOURCES.items():
    src = torchscript_clip if file is None else GOLDEN / file
    _convert(src, clip_json, root / name)
    out[name] = root / name
  return out


@functools.lru_cache(maxsize=None)
def _jit_backbone_out():
  return nnx.jit(lambda model, x: model.features(x)["backbone_out"])


def _convert(src, clip_json, out, **kw):
  logs = []
  convert.convert_clip_file(str(src), clip_json, str(out), log=logs.append, **kw)
  return logs


def _backbone_out(directory, arrays):
  model = load_pretrained(directory, dtype="float64", param_dtype="float64")
  x = jnp.asarray(torch_input_to_jax(arrays["input"]), jnp.float64)
  out = _jit_backbone_out()(model, x)  # (N*T', 1+HW, C)
  return np.asarray(out).transpose(1, 0, 2), model


@pytest.mark.parametrize("name", ["openai", "visual", "torchscript"])
def test_clip_float32_layouts_match_upstream(name, converted, x64):
  arrays, _ = golden_case("tiny_clip")
  out, model = _backbone_out(converted[name], arrays)
  assert rel_err(out, arrays["backbone_out"]) < 1e-9
  conv1 = np.asarray(model.backbone.patch_embed[...]).transpose(4, 3, 0, 1, 2)
  np.testing.assert_array_equal(conv1, arrays["inflated_conv1"])


def test_clip_float16_is_the_rounded_float32_tower(converted, x64):
  """fp16 weights are the float32 ones rounded: converted exactly, backbone close."""
  arrays, _ = golden_case("tiny_clip")
  half = flatten(restore_weights(converted["openai_fp16"]))
  full = flatten(restore_weights(converted["visual"]))
  assert half.keys() == full.keys()
  from_clip = {p for p in half if p[0] == "backbone" and "lmhra1" not in p and "lmhra2" not in p}
  assert len(from_clip) == 5 + 3 * 12  # patch, class, pos, ln_pre (2); 12 per block
  for path in half:
    assert half[path].dtype == np.float32
    want = full[path].astype(np.float16).astype(np.float32) if path in from_clip else full[path]
    np.testing.assert_array_equal(half[path], want, err_msg=str(path))
  out, _ = _backbone_out(converted["openai_fp16"], arrays)
  # Not 1e-9: the weights themselves differ from the reference by fp16 rounding (~4e-4).
  assert rel_err(out, arrays["backbone_out"]) < 1e-2


def test_new_parts_are_the_upstream_initialisation(converted):
  cfg = read_config(converted["visual"])
  fresh = flatten(convert.fresh_weights(cfg, 0))  # UniFormerV2(cfg, rngs=nnx.Rngs(0)) (jitted)
  tree = flatten(restore_weights(converted["visual"]))
  clip_leaves = {"patch_embed", "class_embedding", "pos_embedding", "ln_pre", "qkv", "out",
                 "ln_1", "ln_2", "mlp"}
  for path, value in tree.items():
    if path[0] == "backbone" and set(path) & clip_leaves and "lmhra1" not in path \
        and "lmhra2" not in path:
      continue
    np.testing.assert_array_equal(value, np.asarray(fresh[path]), err_msg=str(path))
  # the upstream's zero initialisations that make the backbone start as CLIP
  assert not np.any(tree[("backbone", "blocks", 0, "lmhra1", "up", "kernel")])
  assert not np.any(tree[("temporal", "dec", 0, "out", "kernel")])


def test_inflate_conv1_puts_kernel_on_centre_tap():
  w = np.random.default_rng(0).normal(size=(4, 3, 2, 2)).astype(np.float32)
  out = inflate_conv1(w, 3)
  assert out.shape == (4, 3, 3, 2, 2)
  np.testing.assert_array_equal(out[:, :, 1], w)
  assert not out[:, :, [0, 2]].any()


def test_clip_resolution_change_resizes_pos_embedding():
  _, cfg = golden_case("tiny_clip")
  cfg = model_config(None, **{**cfg, "input_resolution": 48})
  shapes = flatten(weight_shapes(cfg))

  def zeros(paths):
    return {p: np.zeros(shapes[p].shape, shapes[p].dtype) for p in paths}

  src_sd = torch.load(GOLDEN / "tiny_clip_visual.pth", weights_only=True)
  logs = []
  tree = convert_clip(src_sd, cfg, zeros, "tiny_clip_visual.pth", log=logs.append)
  assert any("4x4" in m and "6x6" in m and "bicubic" in m for m in logs), logs
  pos = tree["backbone"]["pos_embedding"]
  src = src_sd["positional_embedding"]
  grid = src[1:].reshape(4, 4, -1).permute(2, 0, 1)[None].double()
  want = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
  want = want[0].permute(1, 2, 0).reshape(36, -1).float().numpy()
  assert pos.shape == (37, 48)
  np.testing.assert_array_equal(pos[0], src[0].numpy())
  np.testing.assert_allclose(pos[1:], want, rtol=0, atol=1e-6)


def test_clip_of_another_model_is_refused(tmp_path):
  import json
  _, cfg = golden_case("tiny_clip")
  path = tmp_path / "cfg.json"
  path.write_text(json.dumps({**cfg, "width": 64, "layers": 4}))
  with pytest.raises(convert.ConversionError) as e:
    _convert(GOLDEN / "tiny_clip_visual.pth", str(path), tmp_path / "out")
  msg = str(e.value)
  assert "tiny_clip_visual.pth" in msg and "width" in msg and "class_embedding" in msg
  assert "layers" in msg
  assert not (tmp_path / "out").exists()


def test_return_list_alone_sets_the_number_of_global_blocks(tmp_path):
  """A CLIP tower holds no global blocks: `--set return_list` decides how many (SSv2 B/16: 8)."""
  import json
  _, cfg = golden_case("tiny_clip")
  path = tmp_path / "cfg.json"
  path.write_text(json.dumps({k: v for k, v in cfg.items()
                              if k not in ("n_layers", "return_list")}))
  _convert(GOLDEN / "tiny_clip_visual.pth", str(path), tmp_path / "out",
           sets={"return_list": [0, 1, 2]})
  c = read_config(tmp_path / "out")
  assert (tuple(c.return_list), c.n_layers, len(c.mlp_dropout)) == ((0, 1, 2), 3, 3)
  assert len(restore_weights(tmp_path / "out")["temporal"]["dec"]) == 3


def test_torchscript_archive_with_foreign_code_is_refused(tmp_path):
  """A data.pkl that names anything but modules, tensors and storages is refused unrun."""
  import pickle
  import zipfile
  from convert.io import ConversionError, load_torch_file
  good = tmp_path / "tower.pt"
  save_torchscript(_Tower(), good)

  class Evil:
    def __reduce__(self):
      return (open, (str(tmp_path / "pwned"), "w"))

  bad = tmp_path / "evil.pt"
  with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
    for item in src.infolist():
      data = src.read(item)
      dst.writestr(item, pickle.dumps(Evil(), protocol=2) if item.filename.endswith(
          "/data.pkl") else data)
  with pytest.raises(ConversionError, match=r"evil\.pt: the TorchScript archive stores "
                     r"(_?io|builtins)\.open, which this reader does not know"):
    load_torch_file(str(bad))
  assert not (tmp_path / "pwned").exists()
