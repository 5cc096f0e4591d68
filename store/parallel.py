"""Running independent tasks in this process and in spawned worker processes, stoppable at once.

:func:`run_tasks` runs one function over a list of tasks with `jobs` converters: this process
plus ``jobs - 1`` workers. Each worker is a one-process
:class:`concurrent.futures.ProcessPoolExecutor` (spawn context: zarr runs an event-loop thread
and torch a thread pool, neither survives fork), so that a worker that dies takes only its
own task with it (an executor with several processes breaks as a whole and cannot say whose
task killed it). Workers take one task at a time once they are up, so their start-up (they
import torch) overlaps with this process converting; whatever no worker has claimed when this
process runs out of work, it does itself.

Guarantees the convert relies on (tests/store/test_store_resume.py):

* workers ignore Ctrl-C and SIGTERM from their first instruction: the terminal and SLURM send
  them to the whole process group, and only this process decides how the run stops;
* a worker that dies (out of memory) fails its own task only, through `lost`, after `discard`
  removed what it left; the other tasks go on;
* on an error or a Ctrl-C here, the workers are killed at once (not after their task) and
  `discard` removes what the killed tasks left;
* a worker whose parent is gone (kill -9) exits instead of waiting for work forever.
"""
from __future__ import annotations

import importlib
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait as wait_for_connections
from typing import Any, TypeVar

from dsca.store._signals import ignore_stop_signals, stop_signals_ignored

__all__ = ["run_tasks"]

_T = TypeVar("_T")
_R = TypeVar("_R")

# how long this process waits for a worker's result before looking again (only when it has no
# task of its own left to run)
_POLL_SECONDS = 1.0


def _call_by_name(work: str, task: Any) -> Any:
    """`module:function` looked up in the calling process, then called on `task`."""
    module, _, name = work.partition(":")
    return getattr(importlib.import_module(module), name)(task)


def _import_work(work: str) -> None:
    """A worker's start-up probe: done once the worker has imported the work's module."""
    importlib.import_module(work.partition(":")[0])


def _exit_with_parent(sentinel: int) -> None:
    """Wait until the parent process is gone, then end this worker (a daemon thread's job)."""
    wait_for_connections([sentinel])
    os._exit(1)


def _start_worker() -> None:
    """First step of every worker process (the executor's initializer)."""
    ignore_stop_signals()  # also when the parent could not start it with the signals ignored
    parent = multiprocessing.parent_process()
    if parent is not None:  # the executor's queues never tell a worker that its parent died
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), daemon=True).start()


class _Worker:
    """One worker process: its executor, the future it is busy with, and the task behind it.

    `future` is the start-up probe until the worker is up, then the task's; None while idle.
    `task` is None while starting or idle.
    """

    def __init__(self, ctx: multiprocessing.context.BaseContext, work: str) -> None:
        self.executor = ProcessPoolExecutor(1, mp_context=ctx, initializer=_start_worker)
        with stop_signals_ignored():  # the executor starts its process in this first submit
            self.future: Future | None = self.executor.submit(_import_work, work)
        self.task: Any = None

    def give(self, work: str, task: Any) -> None:
        """Start `task` on this (idle) worker."""
        self.task = task
        self.future = self.executor.submit(_call_by_name, work, task)

    def kill(self) -> None:
        """Stop the process now, whatever it is doing, and release the executor."""
        kill_workers = getattr(self.executor, "kill_workers", None)  # Python >= 3.14
        if kill_workers is not None:
            kill_workers()
        else:
            # what kill_workers does: shutdown() alone would let the task run to its end
            for proc in list((getattr(self.executor, "_processes", None) or {}).values()):
                proc.kill()
        self.executor.shutdown(wait=True, cancel_futures=True)


def run_tasks(tasks: Sequence[_T], jobs: int, work: str, *, lost: Callable[[_T], _R],
              discard: Callable[[_T], None]) -> Iterator[_R]:
    """Run `work` on each task with `jobs` converters (this process + jobs - 1 workers).

    Args:
        tasks: picklable tasks.
        work: ``"module:function"``, imported by name in each process: a worker imports its
            own copy of the module (spawn), this process looks it up when it runs a task.
            Whatever it raises ends the run (after the workers were stopped).
        lost: the result for a task whose worker process died.
        discard: removes what an unfinished run of a task left; called for a task whose
            worker died (before `lost`) and for every task a stopped worker was running.

    Yields:
        One result per task, in the order they finish.
    """
    pending = deque(tasks)
    if jobs <= 1 or len(tasks) <= 1:
        while pending:
            yield _call_by_name(work, pending.popleft())
        return
    ctx = multiprocessing.get_context("spawn")
    workers = [_Worker(ctx, work) for _ in range(min(jobs, len(tasks)) - 1)]
    try:
        while pending or any(w.task is not None for w in workers):
            waiting = {w.future: w for w in workers if w.future is not None}
            done, _ = wait(waiting, timeout=0 if pending else _POLL_SECONDS, return_when=FIRST_COMPLETED)
            for future in done:
                worker = waiting[future]
                task, worker.task, worker.future = worker.task, None, None
                try:
                    result = future.result()
                except BrokenProcessPool:
                    workers.remove(worker)
                    worker.executor.shutdown(wait=False)
                    if task is not None:
                        discard(task)
                        yield lost(task)
                    continue
                if task is not None:
                    yield result
                if pending:
                    worker.give(work, pending.popleft())
            if pending:
                yield _call_by_name(work, pending.popleft())
    finally:
        # normally no worker holds a task here; on an error or Ctrl-C the ones still running
        # are killed and what they left half-done is removed
        for worker in workers:
            worker.kill()
        for worker in workers:
            if worker.task is not None:
                discard(worker.task)
