"""benchmarks/profile_step.py: reading XLA's profile proto and attributing HLO to source lines."""

import struct

import jax
import jax.numpy as jnp

from benchmarks.profile_step import category, describe_instructions, instruction_costs


def _varint(n):
  out = bytearray()
  while True:
    out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
    n >>= 7
    if not n:
      return bytes(out)


def _field(number, wire, payload):
  return _varint(number << 3 | wire) + payload


def _cost(name, us):
  body = (_field(1, 2, _varint(len(name)) + name.encode())
          + _field(2, 1, struct.pack("<d", us)))
  return _field(1, 2, _varint(len(body)) + body)


def test_instruction_costs_decodes_profiled_instructions_proto():
  latency = _field(2, 2, _varint(3) + b"\x0a\x01a")  # a Latency entry: skipped
  blob = _cost("fusion.12", 415.25) + latency + _cost("custom-call.3" * 20, 0.5)
  assert instruction_costs(blob) == {"fusion.12": 415.25, "custom-call.3" * 20: 0.5}


def test_describe_instructions_names_the_source_line():
  def f(a, b):
    return jnp.tanh(a @ b).sum()  # the line the dot must be attributed to
  line = f.__code__.co_firstlineno + 1
  hlo = jax.jit(f).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile().as_text()
  info = describe_instructions(hlo)
  dots = [v for v in info.values() if v["op"] == "dot"]
  assert dots and all(v["source"].startswith(f"test_profile_tool.py:{line} ") for v in dots)
  assert category(dict(op="fusion", kind="kLoop", target="")) == "loop fusion (element-wise)"
  assert category(dict(op="custom-call", kind="", target="__cublas$lt$matmul")) == "gemm (cuBLAS)"
