"""What the router tells the outside once a change is committed: replies, ``completed`` documents and
task notifications.

* A reply (``accepted``, ``rejected``, an RPC answer) goes to the client's ``reply_to`` queue, not
  mandatory: a client that went away must not make the router fail; it can ask again.
* A finished workflow's ``completed`` document goes to its submitter, to every resubmitting client that
  waits for it, and to ``{ns}.notify``; the workflow is then saved ``notified``. At least once: a crash
  after sending and before saving sends it again on restart.
* Task notifications are progress signals, not records: queued in memory (bounded), published
  unconfirmed by one sender, dropped when the broker is slow.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from typing import Any

from fabric.errors import StoreError
from fabric.protocol import codec
from fabric.protocol.messages import Completed, ErrorInfo, TaskOutcome
from fabric.store import StateStore
from fabric.store.base import TaskRecord, WorkflowRecord
from fabric.topology import names
from fabric.transport.amqp import DEFAULT_EXCHANGE, AmqpConnection

log = logging.getLogger("fabric.router")

#: Task notifications waiting to be sent at most; beyond, progress signals are dropped rather than queued.
MAX_PENDING_NOTES = 10_000
#: Notifications the sender publishes before it lets other work on the event loop run.
_NOTES_PER_TURN = 256
#: Workflows whose ``notify_tasks`` flag the router remembers (most recently seen first out last).
_NOTIFY_FLAGS_MEMORY = 10_000
#: How long a remembered ``notify_tasks`` = False holds before the router reads the flag again.
_NOTIFY_FLAG_TTL_S = 1.0


class Announcer:
    """Sends the router's replies, ``completed`` documents and task notifications.

    Args:
        amqp: the router's broker connection.
        store: the state store (a finished workflow is saved ``notified``).
        namespace: the fabric's namespace.
        task_notifications: ``off``, ``requested`` (workflows submitted with ``notify_tasks``) or ``all``.
        stats: the router's counters; ``completed`` counts the workflows announced.
    """

    def __init__(
        self,
        amqp: AmqpConnection,
        store: StateStore,
        namespace: str,
        *,
        task_notifications: str,
        stats: dict[str, int],
    ) -> None:
        self._amqp = amqp
        self._store = store
        self._ns = namespace
        self._mode = task_notifications
        self._stats = stats
        #: Task notifications (routing key, encoded body) waiting for the one sender, oldest first.
        self.pending: deque[tuple[str, bytes]] = deque()
        self._waiting = asyncio.Event()
        #: workflow id -> (notify_tasks, when read): the flags of recently seen workflows.
        self._flags: OrderedDict[str, tuple[bool, float]] = OrderedDict()

    # -- replies and completed documents ----------------------------------------------------------

    async def reply(
        self, reply_to: str | None, correlation_id: str | None, doc: dict[str, Any], content_type: str
    ) -> None:
        """Send one reply document to ``reply_to`` (nothing without one)."""
        if reply_to:
            await self.reply_raw(reply_to, correlation_id, codec.encode(doc, content_type), content_type)

    async def reply_raw(
        self, reply_to: str | None, correlation_id: str | None, body: bytes, content_type: str
    ) -> None:
        if not reply_to:
            return
        # mandatory=False: a client that went away must not make the router fail; it can ask again.
        await self._amqp.publish(
            DEFAULT_EXCHANGE,
            reply_to,
            body,
            content_type=content_type,
            correlation_id=correlation_id,
            mandatory=False,
            persistent=False,
        )

    async def completion_document(
        self, workflow: WorkflowRecord, tasks: Mapping[str, TaskRecord] | None = None
    ) -> dict[str, Any]:
        """The ``completed`` document of a finished workflow (its tasks read when not given)."""
        if tasks is None:
            tasks = await self._store.get_tasks(workflow.workflow_id)
        document = Completed(
            workflow_id=workflow.workflow_id,
            status=workflow.status,
            tasks={
                t.task_id: TaskOutcome(
                    status=t.status,
                    result=t.result,
                    error=ErrorInfo(**t.error) if t.error else None,
                    attempts=t.attempts,
                    agent=t.agent,
                )
                for t in tasks.values()
            },
        )
        return document.model_dump(mode="python")

    async def announce(self, workflow: WorkflowRecord, tasks: Mapping[str, TaskRecord] | None = None) -> None:
        """Send the ``completed`` document to the submitter, the waiting clients and ``{ns}.notify``,
        then save the workflow ``notified``."""
        document = await self.completion_document(workflow, tasks)
        body = codec.encode(document, workflow.content_type)
        await asyncio.gather(
            self.reply_raw(workflow.reply_to, workflow.correlation_id, body, workflow.content_type),
            *(
                self.reply_raw(to, corr or None, body, workflow.content_type)
                for to, corr in workflow.subscribers
            ),
            self._amqp.publish(
                names.notify_exchange(self._ns),
                names.workflow_notify_key(workflow.workflow_id, str(workflow.status)),
                body,
                content_type=workflow.content_type,
                mandatory=False,
            ),
        )
        workflow.notified = True
        await self._store.save(workflows=[workflow])
        self._stats["completed"] += 1
        log.debug("workflow %s %s", workflow.workflow_id, workflow.status)

    # -- task notifications -----------------------------------------------------------------------

    async def send_notes(
        self, workflow_id: str, workflow: WorkflowRecord | None, notes: Iterable[dict[str, Any]]
    ) -> None:
        """Queue a committed change's task notifications, if the workflow gets them (``workflow``: its
        record when the change loaded it)."""
        notes = list(notes)
        if not notes or self._mode == "off":
            return
        if self._mode == "requested" and not await self._wanted(workflow_id, workflow):
            return
        for note in notes:
            self._queue(note)

    async def _wanted(self, workflow_id: str, workflow: WorkflowRecord | None) -> bool:
        """The workflow's ``notify_tasks`` flag: from its record, from memory, else from the store.

        A remembered False is read again after a second, so a resend asking for notifications that
        another router admitted is seen soon.
        """
        if workflow is not None:
            return self.remember_flag(workflow)
        wanted, seen_at = self._flags.get(workflow_id, (False, -_NOTIFY_FLAG_TTL_S))
        if wanted or time.monotonic() - seen_at < _NOTIFY_FLAG_TTL_S:
            return wanted
        try:
            stored = await self._store.get_workflow(workflow_id)
        except StoreError as exc:
            log.debug("task notifications of %s not sent: %s", workflow_id, exc)
            return False
        return stored is not None and self.remember_flag(stored)

    def remember_flag(self, workflow: WorkflowRecord) -> bool:
        """Remember the workflow's ``notify_tasks`` flag (bounded), and return it."""
        flags = self._flags
        flags[workflow.workflow_id] = (workflow.notify_tasks, time.monotonic())
        flags.move_to_end(workflow.workflow_id)
        while len(flags) > _NOTIFY_FLAGS_MEMORY:
            flags.popitem(last=False)
        return workflow.notify_tasks

    def _queue(self, note: dict[str, Any]) -> None:
        """Queue a task's new status for ``{ns}.notify``, sent unconfirmed by :meth:`note_sender`."""
        if len(self.pending) >= MAX_PENDING_NOTES:
            return  # the broker is slow: drop progress signals rather than hold memory
        key = names.task_notify_key(note["workflow_id"], note["task_id"], note["status"])
        self.pending.append((key, codec.encode(note)))
        self._waiting.set()

    async def note_sender(self) -> None:
        """Publish the queued task notifications, oldest first, one at a time (runs until cancelled).

        One sender and a queue of encoded bodies, not a task per notification: under load the
        notifications wait for the connection's writer, and 10,000 waiting tasks (each with its
        coroutine, timeout and lock waiter) held tens of MB of the router's memory; the queue holds a
        few MB at most."""
        exchange = names.notify_exchange(self._ns)
        while True:
            await self._waiting.wait()
            self._waiting.clear()
            sent = 0
            while self.pending:
                key, body = self.pending.popleft()
                try:
                    await self._amqp.publish_unconfirmed(exchange, key, body)
                except Exception as exc:  # not connected (closing): best effort, like a dropped one
                    log.debug("task notification not sent: %s", exc)
                sent += 1
                if sent % _NOTES_PER_TURN == 0:
                    await asyncio.sleep(0)  # an uncontended publish never yields: let the loop run
