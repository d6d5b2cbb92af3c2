"""The converters' command line (python -m convert ...), run by the converter tests."""

import contextlib
import io
import json
import os
import subprocess
import sys

from conftest import golden_case
from convert.__main__ import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_file(tmp_path, case, **changes):
  _, cfg = golden_case(case)
  path = tmp_path / f"{case}.json"
  path.write_text(json.dumps({**cfg, **changes}))
  return str(path)


def run_cli(*args):
  """`python -m convert ...` in a subprocess; returns (exit code, stdout + stderr)."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-W", "ignore", "-m", "convert", *map(str, args)],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  return p.returncode, p.stdout + p.stderr


def cli(*args):
  """The same command line, in-process (faster); returns (exit code, stderr text)."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    code = cli_main([str(a) for a in args])
  return code, err.getvalue()


def only_entries(parent):
  return sorted(os.listdir(parent))
