"""Running handlers: the concurrency limit, each attempt's time limit, threads for sync handlers, and
stopping a running handler (an operator's cancel, a lease given up). No broker: what a run comes to is
an :class:`~fabric.worker.outcome.Outcome`, carried out by the settlement.

Sync handlers run on daemon threads of their own: a thread cannot be killed, so one stuck past its
timeout keeps its concurrency slot until it returns, and never keeps the process from exiting.

Example:
    >>> execution = Execution(4, RetryPolicy(), draining=lambda: False, is_cancelled=lambda task: False)
    >>> slot = await execution.take_slot()
    >>> outcome = await execution.run(handler, task, slot, facts)
    >>> slot.release()
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable
from typing import Any

from fabric.errors import HandlerSignal
from fabric.policy import FailurePolicy
from fabric.protocol.messages import EventStatus
from fabric.worker import outcome as outcome_
from fabric.worker.agent import Handler, Task
from fabric.worker.outcome import Outcome

log = logging.getLogger("fabric.worker")


class Execution:
    """Runs handlers under the concurrency limit and their attempts' time limits.

    Args:
        concurrency: how many handlers run at once.
        policy: decides what a failed run comes to.
        draining: True once the worker takes no new tasks (then no slot is given).
        is_cancelled: whether an operator cancelled a task.
    """

    def __init__(
        self,
        concurrency: int,
        policy: FailurePolicy,
        *,
        draining: Callable[[], bool],
        is_cancelled: Callable[[Task], bool],
    ) -> None:
        self._slots = asyncio.Semaphore(concurrency)
        self._policy = policy
        self._draining = draining
        self._is_cancelled = is_cancelled
        # Deliveries waiting for a free slot; the drain cancels these waits and the tasks go back unstarted.
        self._slot_waits: set[asyncio.Task[bool]] = set()
        #: Tasks running now, with the asyncio future of an async handler (to cancel it).
        self.current: dict[tuple[str, str], tuple[Task, asyncio.Future[Any] | None]] = {}
        #: Sync handlers still running on their threads after their task ended (timed out, cancelled).
        self.overdue_threads = 0
        #: Runs that succeeded, and runs that failed (cancelled ones are neither).
        self.processed = 0
        self.failed = 0

    async def take_slot(self) -> Slot | None:
        """Wait for a concurrency slot; None when the worker is draining (then no slot is taken)."""
        if self._draining():
            return None
        if self._slots.locked():
            wait = asyncio.ensure_future(self._slots.acquire())
            self._slot_waits.add(wait)
            try:
                await wait
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if wait.cancelled() and current is not None and current.cancelling() == 0:
                    return None  # stop_waiting() cancelled the wait: nothing was acquired
                if wait.done() and not wait.cancelled():
                    self._slots.release()  # acquired just before this task itself was cancelled
                raise
            finally:
                self._slot_waits.discard(wait)
        else:
            await self._slots.acquire()
        slot = Slot(self._slots)
        if self._draining():
            slot.release()
            return None
        return slot

    def stop_waiting(self) -> None:
        """The worker drains: tasks waiting for a slot get none (they go back to their queues)."""
        for wait in list(self._slot_waits):
            wait.cancel()

    async def run(self, handler: Handler, task: Task, slot: Slot, facts: outcome_.Attempt) -> Outcome:
        """Run the handler once; return what to report (and, for a failure, the policy's decision)."""
        deadline = asyncio.timeout(task.timeout_s)
        try:
            async with deadline:
                result = await self._call(handler, task, slot)
        except TimeoutError as exc:
            # Else the handler's own TimeoutError (a call it made timed out), not the task's limit.
            timed_out = deadline.expired()
            if timed_out:
                task.cancelled.set()
            limit = task.timeout_s if timed_out else None
            outcome = outcome_.of_error(exc, facts, self._policy, timeout_s=limit)
            _log_failure(task, outcome)
        except asyncio.CancelledError as exc:
            current = asyncio.current_task()
            if current is not None and current.cancelling() > 0:
                task.cancelled.set()
                raise  # the worker itself is being cancelled (drain deadline)
            if self._is_cancelled(task):
                return outcome_.cancelled()
            # The handler raised CancelledError of its own accord: a handler failure like any other.
            log.info("task %s/%s failed: handler raised CancelledError", task.workflow_id, task.task_id)
            outcome = outcome_.of_error(exc, facts, self._policy)
        except HandlerSignal as signal:
            outcome = outcome_.of_error(signal, facts, self._policy)
        except Exception as exc:
            outcome = outcome_.of_error(exc, facts, self._policy)
            _log_failure(task, outcome)
        else:
            outcome = outcome_.of_result(result, facts, self._policy)
        if outcome.status is EventStatus.SUCCEEDED:
            self.processed += 1
        else:
            self.failed += 1
        return outcome

    def stop(self, workflow_id: str, task_ids: list[str] | None) -> None:
        """Stop the running handlers of a cancel just learnt (``task_ids`` None: the whole workflow)."""
        if not self.current:
            return
        wanted = None if task_ids is None else set(task_ids)
        for (wf, task_id), (task, running) in list(self.current.items()):
            if wf == workflow_id and (wanted is None or task_id in wanted):
                task.cancelled.set()  # a sync handler sees it through task.is_cancelled
                if running is not None:
                    running.cancel()
                log.info("cancelling running task %s/%s", wf, task_id)

    def give_up(self, task: Task) -> None:
        """Stop ``task``'s handler, whose attempt is given up: a sync one is told, an async one cancelled."""
        task.cancelled.set()
        current = self.current.get((task.workflow_id, task.task_id))
        if current is not None and current[1] is not None:
            current[1].cancel()

    async def _call(self, handler: Handler, task: Task, slot: Slot) -> Any:
        """Call the handler: async ones on the event loop, sync ones on a daemon thread of their own."""
        key = (task.workflow_id, task.task_id)
        if handler.is_async:
            running = asyncio.ensure_future(handler.func(task))
            self.current[key] = (task, running)
            try:
                return await running
            finally:
                self.current.pop(key, None)
        thread = HandlerThread(handler.func, task, name=f"fabric-{handler.capability}-{task.task_id}")
        self.current[key] = (task, None)
        try:
            return await thread.result
        finally:
            self.current.pop(key, None)
            if not thread.finished:
                # Timed out or cancelled: a thread cannot be killed. Its flag asks a cooperative handler
                # to stop; until the thread returns it keeps its concurrency slot, so the tasks after
                # it wait for a slot instead of timing out behind it.
                task.cancelled.set()
                self.overdue_threads += 1
                log.warning(
                    "sync handler of task %s/%s is still running; its slot stays taken until it returns",
                    task.workflow_id,
                    task.task_id,
                )
                slot.hold_until(thread)
                thread.when_finished(self._thread_returned)

    def _thread_returned(self) -> None:
        self.overdue_threads -= 1


def _log_failure(task: Task, outcome: Outcome) -> None:
    error = outcome.error
    assert error is not None
    log.info("task %s/%s failed: %s: %s", task.workflow_id, task.task_id, error.type, error.message)


class Slot:
    """One taken concurrency slot, given back once: when its task ends or, for a sync handler still
    running after its task ended, when the handler's thread returns."""

    __slots__ = ("_held", "_hold", "_slots")

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots = slots
        self._held = True
        self._hold = False

    def hold_until(self, thread: HandlerThread) -> None:
        """Keep the slot past :meth:`release` until ``thread`` returns."""
        self._hold = True
        thread.when_finished(self._give_back)

    def release(self) -> None:
        if not self._hold:
            self._give_back()

    def _give_back(self) -> None:
        if self._held:
            self._held = False
            self._slots.release()


class HandlerThread:
    """A sync handler running on a daemon thread of its own; :attr:`result` resolves on the event loop.

    One thread per call, so a handler stuck past its timeout never leaves the next tasks without a
    thread; a daemon thread, so a stuck handler never keeps the process from exiting.
    """

    def __init__(self, func: Callable[[Task], Any], task: Task, *, name: str) -> None:
        self._loop = asyncio.get_running_loop()
        self.result: asyncio.Future[Any] = self._loop.create_future()
        self.finished = False
        self._on_finish: list[Callable[[], None]] = []
        # The thread runs in a copy of this context: the attempt's span is current there too, so the
        # handler's own spans (plain OpenTelemetry API) nest under it.
        context = contextvars.copy_context()
        threading.Thread(target=context.run, args=(self._main, func, task), name=name, daemon=True).start()

    def when_finished(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the event loop once the thread has returned (at once if it has)."""
        if self.finished:
            callback()
        else:
            self._on_finish.append(callback)

    def _main(self, func: Callable[[Task], Any], task: Task) -> None:
        try:
            value = func(task)
        except BaseException as exc:
            self._hand_over(False, exc)
        else:
            self._hand_over(True, value)

    def _hand_over(self, ok: bool, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the worker is gone
            self._loop.call_soon_threadsafe(self._finish, ok, value)

    def _finish(self, ok: bool, value: Any) -> None:
        self.finished = True
        if not self.result.done():  # not cancelled by a timeout
            if ok:
                self.result.set_result(value)
            else:
                self.result.set_exception(value)
        callbacks, self._on_finish = self._on_finish, []
        for callback in callbacks:
            callback()
