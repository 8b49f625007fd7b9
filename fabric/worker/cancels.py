"""The cancellations a worker knows, and how it keeps them in step with the router.

A cancel is broadcast on ``{ns}.control`` to the workers running at that moment. Copies of a cancelled
task's message can outlive that moment (in a capability queue, in a delay queue, handed back), and a
worker that starts later, or was reconnecting, never heard the broadcast. So a worker:

1. binds its control queue before it consumes any task, so no broadcast after that is missed;
2. then asks the router for the list of cancelled tasks whose copies may still be out (the RPC
   ``cancelled``, one page after another), at start and again after every reconnect;
3. holds each task it receives until that list is in (at most :data:`CANCEL_SYNC_TIMEOUT_S`; if no router
   answers, tasks run and the worker asks again every :data:`CANCEL_SYNC_RETRY_S`).

A copy of a cancelled task is then dropped wherever it came from: acked and reported ``cancelled``, never
run, never handed on, never parked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from fabric.errors import FabricError, ProtocolError
from fabric.protocol import codec
from fabric.topology import names
from fabric.transport.amqp import AmqpConnection, Consumer, Delivery
from fabric.worker import background

log = logging.getLogger("fabric.worker")

#: Seconds a task waits for the cancel list (at start, after a reconnect) before it runs anyway.
CANCEL_SYNC_TIMEOUT_S = 5.0
#: Seconds between two requests for the cancel list while no router answers.
CANCEL_SYNC_RETRY_S = 5.0
#: Cancellations a worker remembers (oldest forgotten first).
MAX_CANCELLED = 100_000
#: Pages of the cancel list one sync reads at most (each holds up to 10,000 tasks).
MAX_PAGES = 100

#: Called for each cancel learnt: the workflow, and its task ids (None: the whole workflow).
OnCancel = Callable[[str, list[str] | None], None]


class CancelList:
    """Cancelled workflows and tasks, bounded (the oldest are forgotten first).

    Example:
        >>> cancels = CancelList()
        >>> cancels.add("wf", ["a"])
        >>> cancels.covers("wf", "a"), cancels.covers("wf", "b")
        (True, False)
    """

    def __init__(self, limit: int = MAX_CANCELLED) -> None:
        self._limit = limit
        self._keys: OrderedDict[tuple[str, str | None], None] = OrderedDict()

    def add(self, workflow_id: str, task_ids: list[str] | None) -> None:
        """Remember a cancel of these tasks (None: every task of the workflow)."""
        keys: list[tuple[str, str | None]] = (
            [(workflow_id, None)] if task_ids is None else [(workflow_id, t) for t in task_ids]
        )
        for key in keys:
            self._keys[key] = None
            self._keys.move_to_end(key)
        while len(self._keys) > self._limit:
            self._keys.popitem(last=False)

    def covers(self, workflow_id: str, task_id: str) -> bool:
        return (workflow_id, None) in self._keys or (workflow_id, task_id) in self._keys

    def __len__(self) -> int:
        return len(self._keys)


def parse_control(message: Any) -> tuple[str, list[str] | None] | None:
    """The cancel a ``{ns}.control`` message carries (``{"kind": "cancel", "workflow_id",
    "task_ids"?}``), or None for anything else (other kinds are for other features).

    Example:
        >>> parse_control({"kind": "cancel", "workflow_id": "wf", "task_ids": ["a"]})
        ('wf', ['a'])
    """
    if not isinstance(message, dict) or message.get("kind") != "cancel":
        return None
    workflow_id = message.get("workflow_id")
    if not isinstance(workflow_id, str):
        return None
    task_ids = message.get("task_ids")
    if not task_ids or not isinstance(task_ids, list):
        return workflow_id, None
    return workflow_id, [str(t) for t in task_ids]


def parse_cancels(data: Any) -> tuple[list[tuple[str, list[str]]], str | None]:
    """The cancels of one page of the RPC ``cancelled`` and the cursor of the next (None: the last).

    Raises:
        ProtocolError: the answer does not have the documented shape.
    """
    if not isinstance(data, dict) or not isinstance(data.get("cancels"), list):
        raise ProtocolError(f"the answer to `cancelled` is not a map with a list of cancels: {data!r:.200}")
    found = []
    for entry in data["cancels"]:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("workflow_id"), str)
            or not isinstance(entry.get("task_ids"), list)
        ):
            raise ProtocolError(f"malformed entry in the answer to `cancelled`: {entry!r:.200}")
        found.append((entry["workflow_id"], [str(t) for t in entry["task_ids"]]))
    cursor = data.get("cursor")
    more = bool(data.get("more"))
    if more and not isinstance(cursor, str):
        raise ProtocolError("the answer to `cancelled` says more follow but carries no cursor")
    return found, cursor if more else None


class CancelSync:
    """Keeps a worker's :class:`CancelList` in step: the broadcasts on ``{ns}.control``, and the RPC
    ``cancelled`` at start and after each reconnect. ``on_cancel`` is called for every cancel learnt
    (to stop running handlers).

    Example:
        >>> sync = CancelSync(amqp, "fabric", on_cancel=stop_running)
        >>> await sync.start()  # before consuming tasks
        >>> await sync.ready()  # in each task, before it may run
    """

    def __init__(
        self,
        amqp: AmqpConnection,
        ns: str,
        on_cancel: OnCancel,
        *,
        timeout_s: float = CANCEL_SYNC_TIMEOUT_S,
        retry_s: float = CANCEL_SYNC_RETRY_S,
    ) -> None:
        self.cancels = CancelList()
        self._amqp = amqp
        self._ns = ns
        self._on_cancel = on_cancel
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._queue: Consumer | None = None
        self._pending: dict[str, asyncio.Future[Any]] = {}
        #: Set once the list is in, or once a sync gave up waiting (then tasks run without it).
        self._synced = asyncio.Event()
        self._sync: asyncio.Task[None] | None = None
        #: Completed syncs (for tests and logs).
        self.syncs = 0

    async def start(self) -> None:
        """Bind the control queue, then ask the router for the list (in the background)."""
        self._queue = await self._amqp.reply_queue(self._on_message, prefetch=16)
        await self._queue.bind(names.control_exchange(self._ns), "")
        self._amqp.on_lost.append(self._lost)
        self._amqp.on_restored.append(self._restored)
        self._resync()

    async def close(self) -> None:
        await background.stop(self._sync, "cancel list sync")
        self._synced.set()

    def covers(self, workflow_id: str, task_id: str) -> bool:
        return self.cancels.covers(workflow_id, task_id)

    async def ready(self) -> None:
        """Wait until the list is in (bounded: a sync gives up after its timeout)."""
        if self._synced.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._synced.wait(), self._timeout_s)

    # -- the broadcast ----------------------------------------------------------------------------

    def _learn(self, workflow_id: str, task_ids: list[str] | None) -> None:
        self.cancels.add(workflow_id, task_ids)
        self._on_cancel(workflow_id, task_ids)

    async def _on_message(self, delivery: Delivery) -> None:
        """A broadcast on ``{ns}.control``, or an answer of the router to this worker's request."""
        await delivery.ack()
        try:
            message = codec.decode(delivery.body, delivery.content_type or codec.MSGPACK)
        except ProtocolError as exc:
            log.warning("malformed control message ignored: %s", exc)
            return
        waiting = self._pending.pop(delivery.correlation_id or "", None)
        if waiting is not None:
            if not waiting.done():
                waiting.set_result(message)
            return
        cancel = parse_control(message)
        if cancel is not None:
            self._learn(*cancel)

    # -- the list ---------------------------------------------------------------------------------

    def _lost(self) -> None:
        # Broadcasts are missed while the connection is down: tasks delivered after it is back wait
        # for the list again (asked for once the connection is restored).
        if self._sync is not None:
            self._sync.cancel()
        self._synced.clear()

    def _restored(self) -> None:
        self._resync()

    def _resync(self) -> None:
        self._synced.clear()
        if self._sync is not None:
            self._sync.cancel()
        self._sync = asyncio.create_task(self._sync_until_done(), name="fabric-cancel-sync")

    async def _sync_until_done(self) -> None:
        warned = False
        while True:
            try:
                count = await asyncio.wait_for(self._fetch(), self._timeout_s)
            except Exception as exc:
                if not warned:
                    log.warning(
                        "could not get the list of cancelled tasks from a router (%s); tasks run "
                        "without it meanwhile, and it is asked for again every %.0fs",
                        self._why(exc),
                        self._retry_s,
                    )
                    warned = True
                self._synced.set()  # no router answers: tasks are not held any longer
                await asyncio.sleep(self._retry_s)
                continue
            self.syncs += 1
            self._synced.set()
            log.log(
                logging.WARNING if warned else logging.INFO,
                "cancel list in from the router: %d cancelled task(s) whose copies this worker drops",
                count,
            )
            return

    def _why(self, exc: Exception) -> str:
        if isinstance(exc, TimeoutError):
            return f"no answer within {self._timeout_s:g}s"
        return str(exc) if isinstance(exc, FabricError) else f"{type(exc).__name__}: {exc}"

    async def _fetch(self) -> int:
        """Read every page of the RPC ``cancelled``; returns how many tasks it listed."""
        info = await self._amqp.queue_info(names.rpc_queue(self._ns))
        if info is None or info.consumers == 0:
            raise _NoRouter(f"no router consumes {names.rpc_queue(self._ns)}")
        count = 0
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            page = await self._ask({} if cursor is None else {"cursor": cursor})
            cancels, cursor = parse_cancels(page)
            for workflow_id, task_ids in cancels:
                self._learn(workflow_id, task_ids)
                count += len(task_ids)
            if cursor is None:
                break
        return count

    async def _ask(self, request: dict[str, Any]) -> Any:
        assert self._queue is not None
        correlation_id = uuid.uuid4().hex
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = answer
        try:
            await self._amqp.publish(
                names.rpc_exchange(self._ns),
                "cancelled",
                codec.encode(request),
                correlation_id=correlation_id,
                reply_to=self._queue.queue_name,
                persistent=False,
                # Not left in the RPC queue for a router that starts much later.
                expiration_s=self._timeout_s,
            )
            reply = await answer
        finally:
            self._pending.pop(correlation_id, None)
        if not isinstance(reply, dict) or not reply.get("ok"):
            error = reply.get("error") if isinstance(reply, dict) else None
            raise _NoRouter(f"the router could not answer `cancelled`: {error}")
        return reply.get("data")


class _NoRouter(FabricError):
    """No router could give the cancel list now."""
