"""Reading PyTorch checkpoint files safely.

`torch.load(weights_only=True)` only rebuilds tensors and plain containers; a file
that needs arbitrary unpickling is refused unless the user trusts it. OpenAI's CLIP
`.pt` files are TorchScript archives: their tensors are read from data.pkl by a restricted
unpickler, without compiling or running the archive's code. Zip-format files can be
memory-mapped (`mmap=True`).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any, Mapping


class ConversionError(ValueError):
  """A conversion that cannot proceed; the message names the file and what to do."""


def _is_torchscript(path: str) -> bool:
  try:
    with zipfile.ZipFile(path) as z:
      names = z.namelist()
  except (zipfile.BadZipFile, OSError):
    return False
  return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def torch_module():
  """The torch package, or a ConversionError saying how to install it."""
  try:
    import torch
  except ImportError:
    raise ConversionError(
        "the converters read and write PyTorch files, so they need PyTorch, which "
        "requirements.txt leaves out (training, evaluation and predict do not use it): "
        "pip install torch (a CPU build is enough: pip install torch --index-url "
        "https://download.pytorch.org/whl/cpu)") from None
  return torch


def check_input_file(path: str) -> None:
  """A local, non-empty file: checked before any output is looked at or any work done."""
  path = os.fspath(path)
  if "://" in path:
    raise ConversionError(f"{path}: PyTorch files are read from a local disk; copy it first "
                          "(gcloud storage cp URL .)")
  if os.path.isdir(path):
    raise ConversionError(f"{path} is a folder; --input takes a PyTorch checkpoint file "
                          "(.pyth/.pth/.pt)")
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such file")
  if os.path.getsize(path) == 0:
    raise ConversionError(f"{path}: the file is empty (truncated download?)")


def load_torch_file(path: str, trust_pickle: bool = False, mmap: bool = True) -> Any:
  """The object stored in a .pt/.pth/.pyth file, with tensors (memory-mapped when possible)."""
  torch = torch_module()
  path = os.fspath(path)
  check_input_file(path)
  is_zip = zipfile.is_zipfile(path)
  if not is_zip:
    with open(path, "rb") as f:
      head = f.read(2)
    if head == b"PK":  # a zip archive without its central directory (at the end)
      raise ConversionError(f"{path}: truncated or corrupt PyTorch file (a zip archive cut "
                            "short: an interrupted download or copy?)")
    if head[:1] != b"\x80":  # torch.save's legacy format opens with a pickle PROTO opcode
      raise ConversionError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip "
                            "archive nor its older pickle format): truncated, corrupt or "
                            "another kind of file")
  if is_zip:
    _check_checksums(path)
  if is_zip and _is_torchscript(path):
    try:
      return torchscript_tensors(path, torch)
    except ConversionError:
      raise
    except Exception as e:  # noqa: BLE001
      raise ConversionError(f"{path}: a TorchScript archive that cannot be read (truncated or "
                            f"corrupt?): {type(e).__name__}: {short_message(e)}") from None
  try:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip and mmap)
  except pickle.UnpicklingError as e:
    msg = str(e)
    if "Weights only load failed" in msg and ("Unsupported global" in msg or "GLOBAL" in msg
                                              or "Unsupported operand" in msg):
      if not trust_pickle:
        raise ConversionError(
            f"{path}: refusing to unpickle: the file stores Python objects besides tensors, and "
            f"loading them can run arbitrary code ({_unsupported(msg)}). If you trust the file, "
            "pass --trust-pickle.") from None
      try:
        return torch.load(path, map_location="cpu", weights_only=False)
      except Exception as e2:  # noqa: BLE001
        raise ConversionError(f"{path}: cannot be unpickled even with --trust-pickle: "
                              f"{type(e2).__name__}: {short_message(e2)}") from None
    raise ConversionError(f"{path}: truncated or corrupt PyTorch file: "
                          f"{short_message(e)}") from None
  except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError,
          IndexError, TypeError) as e:
    if is_zip and "data.pkl" in str(e):
      raise ConversionError(f"{path}: a zip archive but not a PyTorch checkpoint "
                            f"(no data.pkl): {short_message(e)}") from None
    raise ConversionError(f"{path}: truncated or corrupt PyTorch file (or not a PyTorch "
                          f"checkpoint): {type(e).__name__}: {short_message(e)}") from None


def _check_checksums(path: str) -> None:
  """Every member of a zip-format file against its stored CRC-32, which torch.load does not
  check: a file damaged in a download or copy is refused instead of read as other weights.
  A member saved without a checksum (torch's save config compute_crc32=False) is not checked."""
  try:
    with zipfile.ZipFile(path) as z:
      for info in z.infolist():
        if info.CRC == 0 and info.file_size:
          continue
        with z.open(info) as f:  # raises BadZipFile at the end of a member that does not match
          while f.read(1 << 24):
            pass
  except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
    raise ConversionError(f"{path}: corrupt PyTorch file ({short_message(e)}): damaged in a "
                          "download or copy? Download or copy it again") from None


_STORAGE_DTYPES = {"FloatStorage": "float32", "HalfStorage": "float16", "DoubleStorage": "float64",
                   "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
                   "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
                   "BoolStorage": "bool"}


_TYPED_LISTS = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist")


class _ScriptObject:
  """A TorchScript module in data.pkl: only its attribute dict is kept, no code runs."""

  def __setstate__(self, state):
    self.state = state


def torchscript_tensors(path: str, torch) -> dict[str, Any]:
  """{name: tensor} of every tensor attribute of a TorchScript archive's modules, read from its
  data.pkl by a restricted unpickler: the archive's code is neither compiled nor run
  (torch.jit.load is deprecated from torch 2.13 on). For a traced module, as OpenAI's CLIP
  `.pt`, these are its state_dict(); a scripted one's plain tensor attributes come too."""
  with zipfile.ZipFile(path) as z:
    pkl = [n for n in z.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pkl) != 1:
      raise ConversionError(f"{path}: a TorchScript archive without one data.pkl ({pkl})")
    root = pkl[0][:-len("data.pkl")]
    names = set(z.namelist())
    if root + "byteorder" in names and z.read(root + "byteorder").strip() != b"little":
      raise ConversionError(f"{path}: a big-endian TorchScript archive; load it with "
                            "torch.jit.load and torch.save its state_dict()")

    def rebuild(flat, offset, size, stride, *_):
      return torch.as_strided(flat, size, stride, offset)

    class Unpickler(pickle.Unpickler):

      def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
          return _ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
          return rebuild
        if (module, name) == ("collections", "OrderedDict"):
          return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
          return getattr(torch, _STORAGE_DTYPES[name])
        if module == "torch.jit._pickle" and name in _TYPED_LISTS:
          return lambda x: x
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
          return lambda x, _tag: x
        raise ConversionError(f"{path}: the TorchScript archive stores {module}.{name}, which "
                              "this reader does not know; load it with torch.jit.load and "
                              "torch.save its state_dict()")

      def persistent_load(self, pid):
        _, dtype, key, _location, _numel = pid
        name = f"{root}data/{key}"
        raw = bytearray(z.getinfo(name).file_size)  # read in place: one copy in memory
        with z.open(name) as f:
          f.readinto(raw)
        return torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)

    obj = Unpickler(io.BytesIO(z.read(pkl[0]))).load()
  out: dict[str, Any] = {}

  def walk(node, prefix):
    if not isinstance(node.state, dict):  # a TorchScript class or C++ object (packed params)
      raise ConversionError(f"{path}: {prefix.rstrip('.') or 'the module'} is a TorchScript "
                            "object this reader cannot read; load the archive with "
                            "torch.jit.load and torch.save its state_dict()")
    for name, value in node.state.items():
      if isinstance(value, torch.Tensor):
        out[prefix + name] = value
      elif isinstance(value, _ScriptObject):
        walk(value, f"{prefix}{name}.")
  if not isinstance(obj, _ScriptObject):
    raise ConversionError(f"{path}: a TorchScript archive that holds no module")
  walk(obj, "")
  return out


def short_message(e: BaseException, n: int = 300) -> str:
  s = " ".join(str(e).split())
  return s if len(s) <= n else s[:n] + " ..."


def _unsupported(msg: str) -> str:
  for line in msg.splitlines():
    if "Unsupported" in line:
      return line.strip()
  return "non-tensor objects"


def tensor_dict(obj: Any, path: str) -> dict[str, Any]:
  """The {name: tensor} inside a loaded file (unwrapping model_state/state_dict/model)."""
  import torch
  from uniformerv2_jax.torch_layout import WRAPPERS
  sd = obj
  for wrapper in WRAPPERS:
    if isinstance(sd, Mapping) and isinstance(sd.get(wrapper), Mapping):
      sd = sd[wrapper]
  if not isinstance(sd, Mapping) or not sd:
    raise ConversionError(f"{path}: not a state dict (found {type(obj).__name__}); expected a "
                          "mapping of parameter names to tensors, possibly under "
                          "'model_state' or 'state_dict'")
  tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
  others = sorted(str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor))
  if not tensors:
    raise ConversionError(f"{path}: holds no tensors (keys: {others[:10]})")
  if others:
    raise ConversionError(f"{path}: entries that are not tensors: {others[:10]}")
  return dict(tensors)
