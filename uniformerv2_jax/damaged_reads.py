"""A failed Orbax read -> one CheckpointError naming the files, and nothing printed after it.

Orbax restores every array concurrently in an event loop of its own. When one read fails
(a truncated or missing array file), it raises at once and closes that loop while the other
reads are still in flight in TensorStore. Those reads then finish into the closed loop
('Event loop is closed', one traceback each), and they and the failed ones print their own
errors when collected: pages of output under the one message that matters, some of it during
interpreter shutdown, when no hook can filter it any more. So a failed read waits until the
abandoned reads have settled and been collected (well under a second on a local disk), with
exactly that output filtered, before it raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import time
import traceback

SETTLE_TIMEOUT_S = 60.0  # abandoned reads of an object store can take a while


@contextlib.contextmanager
def damaged_files_reported(path: str, what_to_do: str):
  """Orbax/TensorStore failures while reading ``path`` -> one CheckpointError naming it.

  Their errors are plain Exceptions with pages of TensorStore spec; the first line says what
  is wrong. A CheckpointError raised inside passes through unchanged.
  """
  from uniformerv2_jax.checkpoint import CheckpointError
  noise = _AbandonedReadsNoise()  # from the start: a read can finish before `except` runs
  settled = True
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 -- re-raised with the file and what to do
    reason = next((line.strip() for line in str(e).splitlines() if line.strip()), repr(e))
    reason = f"{type(e).__name__}: {reason.split(' See full TensorStore details')[0][:300]}"
    loops = _event_loops_run(e)
    _clear_finished_frames(e)  # they hold the abandoned reads
    settled = _wait_for_abandoned_reads(loops, SETTLE_TIMEOUT_S)
    raise CheckpointError(f"{path}: unreadable or incomplete weights ({reason}); "
                          f"{what_to_do}") from None
  finally:
    if settled:  # else late reads may still print: the filters stay for the process' life
      noise.remove()


class _AbandonedReadsNoise(logging.Filter):
  """Filters the three kinds of output of abandoned Orbax reads while installed, passes the
  rest: as unraisable exceptions, 'Event loop is closed' (a read finishing into the closed
  loop) and the read's own error (its coroutine collected); logged by asyncio, 'Task (or
  Future) exception was never retrieved' (a failed read collected)."""

  def __init__(self):
    super().__init__()
    self.previous_hook = sys.unraisablehook
    sys.unraisablehook = self.unraisable_hook
    logging.getLogger("asyncio").addFilter(self)

  def remove(self) -> None:
    logging.getLogger("asyncio").removeFilter(self)
    if sys.unraisablehook == self.unraisable_hook:
      sys.unraisablehook = self.previous_hook

  def unraisable_hook(self, unraisable):
    error, source = unraisable.exc_value, unraisable.object
    closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    if not (closed_loop or _in_orbax(_code(source))):
      self.previous_hook(unraisable)

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    # a read's error: raised in Orbax, or set by TensorStore (never raised: no traceback)
    return not (error is not None and (error.__traceback__ is None or _raised_in_orbax(error)))


def _code(coroutine):
  """The code object of a coroutine or generator-based coroutine; None for anything else."""
  return getattr(coroutine, "cr_code", None) or getattr(coroutine, "gi_code", None)


def _in_orbax(code) -> bool:
  return code is not None and "/orbax/" in code.co_filename.replace("\\", "/")


def _raised_in_orbax(error: BaseException) -> bool:
  tb = error.__traceback__
  while tb is not None and not _in_orbax(tb.tb_frame.f_code):
    tb = tb.tb_next
  return tb is not None


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


def _clear_finished_frames(error: BaseException) -> None:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    traceback.clear_frames(error.__traceback__)  # skips the frames still running
    error = error.__cause__ or error.__context__


def _wait_for_abandoned_reads(loops: set, timeout_s: float) -> bool:
  """Waits until no unfinished future of the failed read's closed event loops is left alive
  (each is an abandoned read, or waits on one); True when none is, False after `timeout_s`.
  `loops`: those the error came through; the loops of pending Orbax coroutines are added
  (Orbax may run its loop in a thread of its own)."""
  deadline, loops = time.monotonic() + timeout_s, set(loops)
  while True:
    gc.collect()  # collects the reads that have settled, within the filters
    pending = [o for o in gc.get_objects()
               if isinstance(o, asyncio.Future) and not o.done() and o.get_loop().is_closed()]
    loops.update(o.get_loop() for o in pending
                 if isinstance(o, asyncio.Task) and _in_orbax(_code(o.get_coro())))
    left = any(o.get_loop() in loops for o in pending)
    del pending
    if not left:
      return True
    if time.monotonic() > deadline:
      return False
    time.sleep(0.02)
