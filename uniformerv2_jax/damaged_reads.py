"""A failed Orbax read -> one CheckpointError naming the files, and nothing printed after it.

Orbax restores every array concurrently in an event loop of its own. When one read fails
(a truncated or missing array file), it raises at once and closes that loop while the other
reads are still in flight in TensorStore. Those reads then finish into the closed loop
('Event loop is closed', one traceback each), and they and the failed ones print their own
errors when collected: pages of output under the one message that matters, some of it during
interpreter shutdown, when no hook can filter it any more. So a failed read waits until the
abandoned reads have settled and been collected (well under a second on a local disk, up to
SETTLE_TIMEOUT_S from an object store), with exactly that output filtered, before it raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import time
import traceback

SETTLE_TIMEOUT_S = 10.0  # then the error is raised anyway (the filters stay, for this path)


class MetadataMissing(FileNotFoundError):
  """Orbax found no metadata for a checkpoint: it logged a warning and returned None, and left
  the reads it had started in an event loop it closed."""


@contextlib.contextmanager
def damaged_files_reported(path: str, what_to_do: str):
  """Orbax/TensorStore failures while reading ``path`` -> one CheckpointError naming it.

  Their errors are plain Exceptions with pages of TensorStore spec; the first line says what
  is wrong. A CheckpointError raised inside passes through unchanged.
  """
  from uniformerv2_jax.checkpoint import CheckpointError
  noise = _AbandonedReadsNoise(path)  # from the start: a read can finish before `except` runs
  settled = True
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 -- re-raised with the file and what to do
    reason = next((line.strip() for line in str(e).splitlines() if line.strip()), repr(e))
    reason = f"{type(e).__name__}: {reason.split(' See full TensorStore details')[0][:300]}"
    loops = _event_loops_run(e) or (_closed_loops_with_pending_futures()
                                    if isinstance(e, MetadataMissing) else set())
    _clear_finished_frames(e)  # they hold the abandoned reads
    settled = _wait_for_abandoned_reads(loops, SETTLE_TIMEOUT_S)
    raise CheckpointError(f"{path}: unreadable or incomplete weights ({reason}); "
                          f"{what_to_do}") from None
  finally:
    if settled:  # else late reads may still print: the filters stay for the process' life
      noise.remove()


class _AbandonedReadsNoise(logging.Filter):
  """While installed, drops the output of abandoned reads of one path and passes the rest:
  unraisable exceptions 'Event loop is closed' (a read finishing into Orbax's closed loop) or
  naming the path (a read's coroutine collected), and asyncio's 'Task (or Future) exception
  was never retrieved' for errors naming the path (a failed read collected)."""

  def __init__(self, path: str):
    super().__init__()
    # TensorStore's messages name the path, without scheme and bucket for an object store
    self.key = path.split("://", 1)[1].split("/", 1)[-1] if "://" in path else path
    self.active, self.previous_hook = True, sys.unraisablehook
    sys.unraisablehook = self.unraisable_hook
    logging.getLogger("asyncio").addFilter(self)

  def remove(self) -> None:
    logging.getLogger("asyncio").removeFilter(self)
    self.active = False  # if another hook was installed over it, it now passes everything on
    if sys.unraisablehook == self.unraisable_hook:
      sys.unraisablehook = self.previous_hook

  def unraisable_hook(self, unraisable):
    error = unraisable.exc_value
    closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    if not (self.active and (closed_loop or self._names_path(error))):
      self.previous_hook(unraisable)

  def filter(self, record: logging.LogRecord) -> bool:
    return not (self.active and record.exc_info and self._names_path(record.exc_info[1]))

  def _names_path(self, error) -> bool:
    return error is not None and self.key in str(error)


def _event_loops_run(error: BaseException) -> set:
  """The event loops whose `run_until_complete` the error came through (Orbax's, for a read)."""
  loops, tb = set(), error.__traceback__
  while tb is not None:
    if tb.tb_frame.f_code.co_name == "run_until_complete":  # f_locals keeps a copy: only here
      owner = tb.tb_frame.f_locals.get("self")
      if isinstance(owner, asyncio.AbstractEventLoop):
        loops.add(owner)
    tb = tb.tb_next
  return loops


def _closed_loops_with_pending_futures() -> set:
  """Closed event loops that still have unfinished futures: after MetadataMissing, the reads
  Orbax abandoned (the failure it caught itself left no frame of its loop to find it by)."""
  gc.collect()
  return {o.get_loop() for o in gc.get_objects()
          if issubclass(type(o), asyncio.Future) and not o.done() and o.get_loop().is_closed()}


def _clear_finished_frames(error: BaseException) -> None:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    traceback.clear_frames(error.__traceback__)  # (the frames still running are skipped)
    error = error.__cause__ or error.__context__


def _wait_for_abandoned_reads(loops: set, timeout_s: float) -> bool:
  """Waits until no unfinished future of the failed read's closed event loops is left alive
  (each is an abandoned read, or waits on one); True when none is, False after `timeout_s`.
  No loop found (Orbax ran it in a thread of its own): nothing to wait for."""
  deadline = time.monotonic() + timeout_s
  while loops:
    gc.collect()  # collects the reads that have settled, within the filters
    # (type(o), not isinstance: that reads o.__class__, which some lazy modules warn about)
    if not any(issubclass(type(o), asyncio.Future) and not o.done() and o.get_loop() in loops
               for o in gc.get_objects()):
      return True
    if time.monotonic() > deadline:
      return False
    time.sleep(0.02)
  return True
