"""Daemon-thread execution of reward calls, with hung-thread accounting (used by `rewards.py`).

Threads cannot be killed, so a reward function that never returns keeps its thread. `start`
runs `Task`s (one call each, completing a plain `concurrent.futures.Future`) on daemon threads
that nothing joins, unlike `ThreadPoolExecutor`, whose threads the interpreter joins at exit: a
hung reward delays neither the caller (it waits on the futures with a deadline) nor interpreter
exit. At the deadline `abandon` cancels the queued tasks and counts the running ones as hung,
per function; a task that finishes late un-counts itself. `check_hung` refuses a call that could
bring the total above `MAX_HUNG_THREADS` (`RewardHangError`, one line naming the function), so
the leak is bounded.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import threading
from collections import Counter
from collections.abc import Callable, Sequence

MAX_HUNG_THREADS = 64  # reward threads allowed to keep running past their deadline, in all


class RewardHangError(ValueError):
    """Too many reward threads are still running past their deadline (`MAX_HUNG_THREADS`)."""


_HUNG_LOCK = threading.Lock()  # guards _HUNG and every Task.finished / Task.hung
_HUNG: Counter[str] = Counter()  # reward fn name -> its threads running past their deadline


def hung_threads() -> int:
    """Reward threads still running past their deadline, over all functions (process-wide)."""
    with _HUNG_LOCK:
        return sum(_HUNG.values())


@dataclasses.dataclass(eq=False)
class Task:
    """One call of a reward function (`run()`), completing `future`; `name` owns it."""

    name: str
    run: Callable[[], object]
    future: cf.Future = dataclasses.field(default_factory=cf.Future)
    finished: bool = False  # run() has returned or raised
    hung: bool = False  # counted in _HUNG: it was still running at its deadline


def _finish(task: Task) -> None:
    with _HUNG_LOCK:
        task.finished = True
        if task.hung:  # a late finisher frees its slot
            _HUNG[task.name] -= 1
            if _HUNG[task.name] <= 0:
                del _HUNG[task.name]


def _work(queue: collections.deque[Task]) -> None:
    """Worker loop: run queued tasks until the queue is empty; cancelled ones never start."""
    while True:
        try:
            task = queue.popleft()
        except IndexError:
            return
        if not task.future.set_running_or_notify_cancel():
            continue
        try:
            result = task.run()
        except BaseException as exc:  # like ThreadPoolExecutor: the future carries it
            _finish(task)
            task.future.set_exception(exc)
            del exc  # no traceback -> frame -> exc cycle
        else:
            _finish(task)
            task.future.set_result(result)


def start(tasks: Sequence[Task], workers: int, name: str) -> None:
    """Run `tasks` on `workers` daemon threads pulling from one shared queue.

    Daemon threads are not joined at interpreter exit (`ThreadPoolExecutor` threads are, by
    concurrent.futures' atexit hook), so a reward function that never returns cannot block it.
    """
    queue = collections.deque(tasks)
    for i in range(min(workers, len(tasks))):
        thread = threading.Thread(target=_work, args=(queue,), name=f"reward-{name}-{i}")
        thread.daemon = True
        thread.start()


def check_hung(new_threads: int, timeout_s: float | None) -> None:
    """Raise `RewardHangError` if some threads are hung and `new_threads` more could bring the
    total above `MAX_HUNG_THREADS` (so hung threads never exceed max(MAX_HUNG_THREADS, the
    threads of one call)). The message names the function with the most hung threads."""
    with _HUNG_LOCK:
        total = sum(_HUNG.values())
        if not total or total + new_threads <= MAX_HUNG_THREADS:
            return
        name, n = max(_HUNG.items(), key=lambda kv: (kv[1], kv[0]))
    timeout = "None" if timeout_s is None else f"{timeout_s:g}"
    others = f" ({total} hung reward threads in all, limit {MAX_HUNG_THREADS})" if total > n else ""
    raise RewardHangError(
        f"reward fn {name!r} has {n} calls still running past data.reward_timeout_s={timeout} s: "
        f"it never returns; fix it or raise the timeout{others}"
    )


def abandon(tasks: Sequence[Task]) -> None:
    """At the deadline: cancel the queued tasks, count the running ones as hung."""
    running = [t for t in tasks if not t.future.cancel()]  # cancel() fails once started
    with _HUNG_LOCK:
        for task in running:
            if not task.finished:
                task.hung = True
                _HUNG[task.name] += 1
