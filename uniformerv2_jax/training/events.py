"""TensorBoard scalars in event files, written without TensorFlow.

A local run on data that needs no tf.data (fake data, benchmarks) then starts seconds sooner:
importing TensorFlow only for its summary writer took 5-12 s of each launch on 2 cores. The
records are what `tf.summary.write` writes for a float32 scalar with the "scalars" plugin's
metadata (the same Event bytes but for the wall time), framed as TFRecords (length, masked
CRC-32C, data, masked CRC-32C): TensorBoard and `tf.data.TFRecordDataset` read them as
TensorFlow's own.
"""

from __future__ import annotations

import os
import socket
import struct
import time

_WRITER = b"uniformerv2_jax"


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
    table.append(c)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  c = 0xFFFFFFFF
  for b in data:
    c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
  c = crc32c(data)
  return struct.pack("<I", (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def tfrecord(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return length + _masked_crc(length) + data + _masked_crc(data)


# Protocol buffer fields, by number: wire type 0 varint, 1 fixed 64-bit, 2 length-delimited.
def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    low, n = n & 0x7F, n >> 7
    out.append(low | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _key(number: int, wire: int) -> bytes:
  return _varint(number << 3 | wire)


def _message(number: int, payload: bytes) -> bytes:
  return _key(number, 2) + _varint(len(payload)) + payload


def _event(wall_time: float, rest: bytes) -> bytes:
  return _key(1, 1) + struct.pack("<d", wall_time) + rest  # Event.wall_time


def header_event(wall_time: float) -> bytes:
  """Event{file_version: "brain.Event:2", source_metadata{writer}}."""
  return _event(wall_time, _message(3, b"brain.Event:2") + _message(10, _message(1, _WRITER)))


def scalar_event(wall_time: float, step: int, tag: str, value: float) -> bytes:
  """Event{step, summary{value{tag, tensor: float32 scalar, metadata: scalars plugin}}}."""
  tensor = _key(1, 0) + _varint(1) + _message(2, b"") + _message(4, struct.pack("<f", value))
  metadata = _message(1, _message(1, b"scalars")) + _key(4, 0) + _varint(1)  # DATA_CLASS_SCALAR
  summary_value = _message(1, tag.encode()) + _message(8, tensor) + _message(9, metadata)
  return _event(wall_time, _key(2, 0) + _varint(step) + _message(5, _message(1, summary_value)))


class EventFile:
  """One event file in a local folder, as TensorBoard names them; appended and flushed."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    self.path = os.path.join(logdir, f"events.out.tfevents.{int(now)}.{socket.gethostname()}."
                                     f"{os.getpid()}.0.v2")
    self._file = open(self.path, "ab")
    self._file.write(tfrecord(header_event(now)))
    self._file.flush()

  def scalars(self, step: int, values: dict) -> None:
    now = time.time()
    self._file.write(b"".join(tfrecord(scalar_event(now, int(step), k, float(v)))
                              for k, v in values.items()))
    self._file.flush()

  def close(self) -> None:
    self._file.close()
