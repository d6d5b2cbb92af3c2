"""Where model directories, workdirs and datasets live: local paths or object-store URLs.

Everything that reads or writes them goes through here (etils.epath, as Orbax and TFDS do):
a local path (made absolute) or a `gs://` URL (kept as written; epath reaches it through
tf.io.gfile, or fsspec when TensorFlow is absent or EPATH_USE_TF=false; `s3://` takes the same
calls but is untested). Paths stay strings; `os.path.join/basename/dirname` are correct for
both on POSIX.

Atomicity differs. Locally a file is written under a temporary name and renamed into place.
An object store writes each object atomically but cannot rename a directory, so writers put
the file that marks a directory complete last (Orbax's `commit_success.txt`, a model
directory's `config.json`) and never replace a directory in place.
"""

from __future__ import annotations

import os
import shutil
import uuid

from etils import epath


def is_url(path) -> bool:
  return "://" in os.fspath(path)


def absolute(path) -> str:
  """An absolute local path, or the URL without a trailing slash."""
  path = os.fspath(path)
  return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def exists(path) -> bool:
  return epath.Path(path).exists()


def isdir(path) -> bool:
  return epath.Path(path).is_dir()


def listdir(path) -> list[str]:
  """Names (not paths) in a directory; [] when there is none."""
  p = epath.Path(path)
  return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def make_public(path, mode: int) -> None:
  """Gives a private temporary file or folder (mkstemp/mkdtemp: 0600/0700) the mode open() and
  mkdir() would have given: `mode` less the process's umask."""
  umask = os.umask(0)  # the umask is only readable by setting it
  os.umask(umask)
  os.chmod(path, mode & ~umask)


def makedirs(path) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def check_free_space(path, needed: int) -> str | None:
  """Why `needed` bytes cannot be written as local `path` (the disk of the folder that will
  hold it, or of its nearest existing parent, has less free), or None. Not checked: object
  stores, and file systems that report no size (some FUSE mounts)."""
  if is_url(path):
    return None
  existing = nearest_existing_folder(path)
  usage = shutil.disk_usage(existing)
  if needed <= usage.free or usage.total == 0:
    return None
  mib = lambda n: f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n:,} bytes"
  return (f"{path} needs about {mib(needed)} and the disk of {existing} has "
          f"{mib(usage.free)} free; free some space or write elsewhere")


def nearest_existing_folder(path) -> str:
  """The local folder that will hold `path`, or its nearest parent that exists."""
  existing = os.path.dirname(os.path.abspath(os.fspath(path)))
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  return existing


def ensure_writable(directory) -> None:
  """Creates `directory` and writes (then deletes) one small file in it, so that a missing
  bucket or missing write permission stops a job now, not at its first save."""
  probe = os.path.join(os.fspath(directory), f".write-check-{uuid.uuid4().hex[:8]}")
  try:
    makedirs(directory)
    epath.Path(probe).write_text("ok")
    epath.Path(probe).unlink()
  except Exception as e:  # noqa: BLE001  (OSError locally; gcsfs / TensorFlow errors in buckets)
    raise PermissionError(
        f"{directory}: cannot write there ({type(e).__name__}: {e}). Check that it exists (for "
        "gs://, the bucket) and that this machine may write to it (on a Cloud TPU VM, a service "
        "account with Storage write access)") from None


def ensure_writable_by_process_0(directory) -> None:
  """`ensure_writable` on process 0 (the one that writes); if it fails, every process raises."""
  from uniformerv2_jax.distributed import on_process_0
  on_process_0(lambda: ensure_writable(directory), PermissionError(
      f"{directory}: process 0 cannot write there (its log says why)"))


def read_text(path) -> str:
  return epath.Path(path).read_text(encoding="utf-8")


def write_text(path, text: str) -> None:
  """Writes `text` so that a reader sees the old file or the new one, never a part of it."""
  path = os.fspath(path)
  if is_url(path):  # one object upload is atomic
    epath.Path(path).write_text(text, encoding="utf-8")
    return
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def find_dirs_containing(root, filename: str, max_depth: int = 6) -> list[str]:
  """Directories at or below `root` (at most `max_depth` levels) that hold `filename`.

  A directory that holds it is not searched further (on an object store every listing and
  every is-directory test is a request; a dataset's shard files are never visited).
  """
  found, level = [], [absolute(root)]
  for _ in range(max_depth + 1):
    below = []
    for d in level:
      names = listdir(d)
      if filename in names:
        found.append(d)
      else:
        below += [os.path.join(d, n) for n in names if isdir(os.path.join(d, n))]
    level = below
  return sorted(found)
