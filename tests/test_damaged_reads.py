"""A failed read with others in flight (Orbax's restore, faked deterministically: the reads
still in flight are finished late by a foreign thread, as TensorStore's are) -> one error."""

import asyncio
import logging
import sys
import threading
import time

import pytest

from uniformerv2_jax.checkpoint import CheckpointError
from uniformerv2_jax.damaged_reads import damaged_files_reported


def abandoning_restore(path: str, in_flight: list, reads: int = 20):
  """Like Orbax's: reads gathered in a loop of their own, closed when the first one fails."""
  async def read(i):
    future = asyncio.get_running_loop().create_future()
    in_flight.append(future)
    try:
      return await future
    except BaseException as e:  # as Orbax's reads: any end (even being closed) names the array
      raise Exception(f"Encountered error while reading {path}/{i}") from e

  async def fail():
    await asyncio.sleep(0.01)
    raise ValueError(f"OUT_OF_RANGE: Error reading {path}/0")

  async def restore():
    await asyncio.gather(fail(), *[read(i) for i in range(1, reads)])

  loop = asyncio.new_event_loop()
  try:
    loop.run_until_complete(restore())
  finally:
    loop.close()


def finish_late(in_flight: list, delay_s: float):
  """TensorStore's part: completes the reads after the loop closed, then lets go of them."""
  time.sleep(delay_s)
  for future in in_flight:
    try:
      future.get_loop().call_soon_threadsafe(future.set_result, None)
    except RuntimeError:  # Event loop is closed
      pass
  in_flight.clear()


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_abandoned_reads_settle_before_the_one_error(tmp_path, capfd):
  path, in_flight = str(tmp_path / "weights"), []
  hook, log_filters = sys.unraisablehook, list(logging.getLogger("asyncio").filters)
  started = time.monotonic()
  threading.Thread(target=finish_late, args=(in_flight, 0.5)).start()
  with pytest.raises(CheckpointError, match=r"weights: unreadable or incomplete weights "
                     r"\(ValueError: OUT_OF_RANGE: Error reading .*/weights/0\); do this"):
    with damaged_files_reported(path, "do this"):
      abandoning_restore(path, in_flight)
  assert in_flight == [] and time.monotonic() - started >= 0.5  # it waited for them
  assert capfd.readouterr().err == ""  # their collected coroutines printed nothing
  assert sys.unraisablehook is hook and logging.getLogger("asyncio").filters == log_filters


def test_other_errors_still_surface_during_a_read(tmp_path, caplog):
  """Only errors that name the path being read are dropped; others are logged as ever."""
  path = str(tmp_path / "weights")
  log = logging.getLogger("asyncio")
  with damaged_files_reported(path, "do this"):
    for message in (f"Error reading {path}/0", "Connection reset by peer"):
      log.error("Future exception was never retrieved", exc_info=(
          ValueError, ValueError(message), None))
  assert [r.exc_info[1].args[0] for r in caplog.records] == ["Connection reset by peer"]


def test_overlapping_reads_leave_no_filter_behind(tmp_path):
  """Two readers that finish in the order they started (not nested): afterwards the hook is
  the original one, or passes everything on, and no log filter is left."""
  hook, seen, log_filters = sys.unraisablehook, [], list(logging.getLogger("asyncio").filters)
  sys.unraisablehook = seen.append
  try:
    first = damaged_files_reported(str(tmp_path / "a"), "do this")
    second = damaged_files_reported(str(tmp_path / "b"), "do this")
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    second.__exit__(None, None, None)
    assert logging.getLogger("asyncio").filters == log_filters
    unraisable = type("Unraisable", (), dict(exc_value=RuntimeError("Event loop is closed"),
                                             object=None))()
    sys.unraisablehook(unraisable)
    assert seen == [unraisable]
  finally:
    sys.unraisablehook = hook
