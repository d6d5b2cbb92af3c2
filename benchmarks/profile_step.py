"""Where a step's device time goes: per-kernel costs joined with the compiled HLO.

  python benchmarks/profile_step.py --model b16 --mode train --batch 32 --attention cudnn

Traces a few steps with the JAX profiler, reads XLA's per-instruction device costs
(`jax.experimental.profiler.get_profiled_instructions_proto`, NVIDIA GPUs only), and
prints one table: time per instruction class (cuBLAS GEMMs, Triton GEMM fusions, cuDNN
attention, element-wise loop fusions, reductions, copies, ...) and the most expensive
instructions with the Python source line that produced them. `--out DIR` also keeps
the HLO text and the raw costs. Layers are not scanned, so that every instruction runs
once per step, and CUDA graphs are switched off (they hide their kernels).

Seen on an H100 (JAX 0.11.2): the costs of cuBLAS GEMMs come back too small (their sum
implied more than the chip's peak), so compare the kernel sum with the wall step time;
the fusions' costs matched a bytes-moved estimate.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import argparse
import collections
import glob
import re
import struct
import tempfile
import time

import jax
import jax.experimental.profiler

from benchmarks.model_throughput import prepare
from uniformerv2_jax import layers


def _varint(buf, i):
  shift = value = 0
  while True:
    byte = buf[i]
    i += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if byte < 0x80:
      return value, i


def _fields(buf):
  """(field number, wire type, value) of a serialized protobuf message."""
  i = 0
  while i < len(buf):
    key, i = _varint(buf, i)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, i = _varint(buf, i)
    elif wire == 1:
      value, i = buf[i:i + 8], i + 8
    elif wire == 2:
      n, i = _varint(buf, i)
      value, i = buf[i:i + n], i + n
    elif wire == 5:
      value, i = buf[i:i + 4], i + 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    yield field, wire, value


def instruction_costs(serialized: bytes) -> dict[str, float]:
  """ProfiledInstructionsProto -> {HLO instruction name: microseconds}."""
  costs = {}
  for field, _, value in _fields(serialized):
    if field != 1:
      continue
    name, cost = None, 0.0
    for f, wire, v in _fields(value):
      if f == 1:
        name = v.decode()
      elif f == 2 and wire == 1:
        cost = struct.unpack("<d", v)[0]
    if name is not None:
      costs[name] = cost
  return costs




def _stack_frames(hlo_text: str) -> dict[int, str]:
  """stack_frame_id -> 'file:line function' of its innermost frame (plus the model.py caller)."""
  sections, current = collections.defaultdict(dict), None
  for line in hlo_text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = line
      continue
    if current is None:
      continue
    m = re.match(r"^(\d+) (.*)$", line)
    if not m:
      current = None
      continue
    sections[current][int(m.group(1))] = m.group(2)
  files, funcs = sections["FileNames"], sections["FunctionNames"]

  def location(loc_id):
    loc = dict(re.findall(r"(\w+)=(\d+)", sections["FileLocations"].get(loc_id, "")))
    file = os.path.basename(files.get(int(loc.get("file_name_id", 0)), '"?"').strip('"'))
    func = funcs.get(int(loc.get("function_name_id", 0)), '"?"').strip('"').split(".")[-1]
    return f"{file}:{loc.get('line', '?')} {func}"

  frames = {}
  for fid, text in sections["StackFrames"].items():
    chain, seen, cur = [], set(), fid
    while cur and cur not in seen and cur in sections["StackFrames"]:
      seen.add(cur)
      ref = dict(re.findall(r"(\w+)=(\d+)", sections["StackFrames"][cur]))
      chain.append(location(int(ref.get("file_location_id", 0))))
      cur = int(ref.get("parent_frame_id", 0))
    caller = next((c for c in chain[1:] if c.startswith("model.py")), None)
    frames[fid] = chain[0] + (f" < {caller}" if caller and not chain[0].startswith("model.py")
                              else "")
  return frames


def describe_instructions(hlo_text: str) -> dict[str, dict]:
  """{instruction name: {op, kind, target, source, op_name}} from a compiled module's text."""
  frames = _stack_frames(hlo_text)
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\b([a-z][\w\-]*)\(", line)
    if not m:
      continue
    name, op = m.group(1), m.group(2)
    kind = re.search(r"kind=(k\w+)", line)
    target = re.search(r'custom_call_target="([^"]+)"', line)
    backend = re.search(r'"kind":"(__\w+)"', line)
    frame = re.search(r"stack_frame_id=(\d+)", line)
    op_name = re.search(r'op_name="([^"]+)"', line)
    out[name] = dict(
        op=op, kind=kind.group(1) if kind else "",
        target=(target.group(1) if target else backend.group(1) if backend else ""),
        source=((frames.get(int(frame.group(1)), "") if frame else "")
                + (" [bwd]" if op_name and "transpose(" in op_name.group(1) else "")),
        op_name=op_name.group(1)[-90:] if op_name else "")
  return out


def category(info: dict | None) -> str:
  if info is None:
    return "unknown"
  target = info["target"]
  if "gemm" in target or "matmul" in target:
    return "triton gemm fusion" if "triton" in target else "gemm (cuBLAS)"
  if "fmha" in target or "cudnn" in target:
    return "cuDNN " + ("attention" if "fmha" in target else target)
  if target:
    return f"custom: {target}"
  if info["op"] == "fusion":
    return {"kLoop": "loop fusion (element-wise)", "kInput": "input fusion (reductions)",
            "kOutput": "output fusion", "kCustom": "custom fusion"}.get(info["kind"], info["kind"])
  return info["op"]


def trace_costs(run, steps: int) -> tuple[dict[str, float], int]:
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(steps):
        out = run()
      jax.block_until_ready(out)
    planes = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
    if not planes:
      raise RuntimeError(f"the profiler wrote no trace under {tmp}")
    proto = jax.experimental.profiler.get_profiled_instructions_proto(os.path.dirname(planes[0]))
    return instruction_costs(proto), os.path.getsize(planes[0])


def _write(out_dir, stem, hlo, costs, info):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{stem}.hlo.txt"), "w") as f:
    f.write(hlo)
  with open(os.path.join(out_dir, f"{stem}.costs.tsv"), "w") as f:
    for n, c in sorted(costs.items(), key=lambda kv: -kv[1]):
      d = info.get(n, {})
      f.write(f"{n}\t{c:.2f}\t{category(info.get(n))}\t{d.get('source', '')}\t"
              f"{d.get('op_name', '')}\n")


def _print_tables(costs, info, top):
  total = sum(costs.values())
  by_cat, counts, by_src = collections.Counter(), collections.Counter(), collections.Counter()
  for n, c in costs.items():
    cat = category(info.get(n))
    by_cat[cat] += c
    counts[cat] += 1
    by_src[(cat, info.get(n, {}).get("source", "?"))] += c
  unmatched = [n for n in costs if n not in info]
  if unmatched:
    print(f"{len(unmatched)} profiled names not in the HLO, e.g. {unmatched[:5]}")
  print("| class | instructions | ms | share |\n|---|---|---|---|")
  for cat, c in by_cat.most_common():
    print(f"| {cat} | {counts[cat]} | {c / 1e3:.2f} | {100 * c / max(total, 1e-9):.1f}% |")
  print("| class | source line | ms |\n|---|---|---|")
  for (cat, src), c in by_src.most_common(top):
    print(f"| {cat} | {src} | {c / 1e3:.2f} |")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="b16")
  p.add_argument("--mode", default="train", choices=("train", "inference"))
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--attention", default="auto")
  p.add_argument("--remat", default="recipe", help="recipe (the recipe's)|none|full|...")
  p.add_argument("--remat_blocks", type=int, default=None, help="default: the recipe's")
  p.add_argument("--step", default="recipe", choices=("recipe", "bare"),
                 help="train step: train.py's (recipe) or forward + backward + AdamW (bare)")
  p.add_argument("--randaugment", default="none", choices=("none", "crops"))
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--dpe", default=layers.DEPTHWISE_IMPL)
  p.add_argument("--attn_pad", type=int, default=layers.TOKEN_PAD_MULTIPLE["cudnn"])
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--top", type=int, default=40)
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--out", default=None, help="folder for the HLO text and the raw costs")
  args = p.parse_args()
  # CUDA graphs (command buffers) hide their kernels from the per-instruction costs.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_gpu_enable_command_buffer=").strip()
  args.scan = False
  layers.DEPTHWISE_IMPL = args.dpe
  layers.TOKEN_PAD_MULTIPLE["cudnn"] = args.attn_pad
  name = "tiny" if args.tiny else args.model
  cfg, compiled, run, _ = prepare(name, args.mode, args.batch, args, args.attention, args.remat,
                                args.step)
  for _ in range(3):
    jax.block_until_ready(run())
  start = time.perf_counter()
  for _ in range(5):
    out = run()
  jax.block_until_ready(out)
  step_ms = (time.perf_counter() - start) / 5 * 1e3
  costs, trace_bytes = trace_costs(run, args.steps)
  hlo = compiled.as_text()
  info = describe_instructions(hlo)
  if args.out:
    _write(args.out, f"{name}_{args.mode}", hlo, costs, info)
  dev = jax.devices()[0]
  print(f"\nDevice: {dev.device_kind} ({dev.platform}), jax {jax.__version__}; {name} "
        f"{args.mode} ({args.step} step) batch {args.batch}, attention {args.attention} (cuDNN pad "
        f"{args.attn_pad}), dpe {args.dpe}, remat {cfg.remat} (blocks {cfg.remat_blocks}), "
        f"randaugment {args.randaugment}")
  print(f"wall step {step_ms:.1f} ms; profiled kernels sum {sum(costs.values()) / 1e3:.1f} ms "
        f"over {len(costs)} instructions (trace {trace_bytes / 1e6:.1f} MB)")
  if not costs:
    print("note: XLA gave no per-instruction costs on this device (NVIDIA GPUs only); the "
          "wall step time above is all there is")
    return
  _print_tables(costs, info, args.top)


if __name__ == "__main__":
  main()
