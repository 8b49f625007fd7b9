"""The async client: submit workflows, wait for results, ask for status.

Example:
    >>> async with FabricClient(load_settings()) as client:
    ...     done = await client.run({"tasks": [{"id": "a", "capability": "demo.echo", "input": 1}]})
    ...     done.tasks["a"].result
    1
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any, Self

from pydantic import ValidationError

from fabric.errors import (
    NotConnectedError,
    ProtocolError,
    RequestRefused,
    SubmissionRejected,
    TransportError,
    WaitTimeout,
    WorkflowNotFound,
)
from fabric.protocol import codec, headers, rpc
from fabric.protocol.messages import Accepted, Completed, Submission
from fabric.settings import FabricSettings, load_settings
from fabric.telemetry import Telemetry
from fabric.topology import names, spec
from fabric.transport.amqp import AmqpConnection, Consumer, Delivery

#: Called with each task notification ({"workflow_id", "task_id", "status", "attempts", "agent", "error"}).
TaskListener = Callable[[dict[str, Any]], None]

#: ``resume`` without a new input (None is a valid input, so it cannot mean "keep").
_KEEP: Any = object()

#: How many finished workflows' documents the client remembers for a later ``wait``.
_COMPLETED_CACHE = 10_000
#: How many of its own submissions the client remembers (older ones are waited for through notify).
_SUBMITTED_MEMORY = 100_000
#: How often ``wait(on_task=...)`` reads the status of a workflow whose task notifications it cannot
#: receive (one submitted without asking for them), to report its task changes.
_PROGRESS_POLL_S = 1.0


class FabricClient:
    """Talks to the router over the broker. Use as ``async with FabricClient(settings) as client:``.

    Args:
        settings: the settings tree (defaults to :func:`load_settings`).
        reply_timeout_s: how long to wait for the router's ``accepted`` reply or a query answer.
    """

    def __init__(self, settings: FabricSettings | None = None, *, reply_timeout_s: float = 30.0) -> None:
        self.settings = settings or load_settings()
        self.ns = self.settings.namespace
        self.reply_timeout_s = reply_timeout_s
        self._amqp = AmqpConnection(
            self.settings.amqp_url.get_secret_value(), name=f"fabric-client:{self.ns}"
        )
        self._reply: Consumer | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        #: Futures of the workflows someone is waiting for right now.
        self._waiters: dict[str, asyncio.Future[Completed]] = {}
        #: Completed documents that arrived while nobody waited (bounded, oldest dropped first).
        self._finished: OrderedDict[str, Completed] = OrderedDict()
        #: Workflows this client submitted (their ``completed`` document comes to our reply queue), each
        #: with True when it asked for task notifications (the router sends them).
        self._submitted: OrderedDict[str, bool] = OrderedDict()
        self._wait_counts: Counter[str] = Counter()
        self._followed: set[str] = set()
        self._listeners: dict[str, list[TaskListener]] = {}
        self._state = "new"

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise NotConnectedError("a FabricClient cannot be reopened; create a new one")
        self._state = "open"
        try:
            await self._amqp.connect()
            # Declaring the core topology lets a client submit before any router ever ran: the
            # submission waits in {ns}.router.submit.
            await self._amqp.declare(spec.core(self.ns))
            self._reply = await self._amqp.reply_queue(self._on_reply, prefetch=1000)
        except BaseException:
            await self._amqp.close()
            self._state = "closed"
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._state = "closed"
        futures: list[asyncio.Future[Any]] = [*self._pending.values(), *self._waiters.values()]
        for future in futures:
            if not future.done():
                future.cancel()
        await self._amqp.close()

    def _require(self) -> Consumer:
        if self._state != "open" or self._reply is None:
            raise NotConnectedError("FabricClient is not open: use 'async with FabricClient(...) as client'")
        return self._reply

    # -- replies ----------------------------------------------------------------------------------

    async def _on_reply(self, delivery: Delivery) -> None:
        await delivery.ack()
        try:
            doc = codec.decode(delivery.body, delivery.content_type or codec.MSGPACK)
        except ProtocolError:
            return
        if not isinstance(doc, dict):
            return
        if doc.get("kind") == "completed":
            with contextlib.suppress(ValidationError):
                self._completed(Completed.model_validate(doc))
            return
        if "task_id" in doc and "status" in doc and "kind" not in doc:
            for listener in self._listeners.get(str(doc.get("workflow_id")), []):
                listener(doc)
            return
        future = self._pending.pop(delivery.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(doc)

    def _completed(self, document: Completed) -> None:
        future = self._waiters.get(document.workflow_id)
        if future is not None:
            if not future.done():
                future.set_result(document)
            return
        self._finished[document.workflow_id] = document
        self._finished.move_to_end(document.workflow_id)
        while len(self._finished) > _COMPLETED_CACHE:
            self._finished.popitem(last=False)

    async def _request(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        content_type: str,
        message_id: str | None,
        headers: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        reply_queue = self._require().queue_name
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            await self._amqp.publish(
                exchange,
                routing_key,
                body,
                content_type=content_type,
                message_id=message_id,
                correlation_id=correlation_id,
                reply_to=reply_queue,
                headers=headers,
            )
            return await asyncio.wait_for(future, self.reply_timeout_s)
        except TimeoutError as exc:
            queued = (
                f"; the submission stays queued in {names.submit_queue(self.ns)} "
                "and is admitted when a router runs"
                if exchange == names.submit_exchange(self.ns)
                else ""
            )
            raise WaitTimeout(
                f"no answer from the router within {self.reply_timeout_s:g}s "
                f"(is `fabric router` running for namespace {self.ns!r}?){queued}"
            ) from exc
        finally:
            self._pending.pop(correlation_id, None)

    # -- submitting -------------------------------------------------------------------------------

    async def submit(
        self,
        workflow: Submission | dict[str, Any],
        *,
        message_id: str | None = None,
        on_task: TaskListener | None = None,
    ) -> Accepted:
        """Submit a workflow and wait for the router to accept it.

        Args:
            workflow: a :class:`Submission` or the same as a dict (docs/protocol.md §2).
            message_id: idempotency key; resending with the same id never creates a second workflow.
            on_task: called with each task notification of this workflow (progress); the
                submission asks the router for them (the ``fabric-notify-tasks`` header).

        Raises:
            SubmissionRejected: the router refused it; ``reason`` is the code, ``detail`` explains.
            WaitTimeout: the router did not answer in ``reply_timeout_s``.
        """
        self._require()
        document = (
            workflow.model_dump(mode="python", exclude_none=True)
            if isinstance(workflow, Submission)
            else workflow
        )
        message_id = message_id or uuid.uuid4().hex
        workflow_id = document.get("workflow_id")
        if isinstance(workflow_id, str) and on_task is not None:
            # Follow before submitting so no task notification can slip past.
            await self._follow(workflow_id, on_task)
        # The caller's own trace (if it has one) becomes the parent of the whole workflow's trace.
        message_headers: dict[str, Any] = {}
        Telemetry.inject(message_headers)
        if on_task is not None:
            message_headers[headers.NOTIFY_TASKS] = True
        reply = await self._request(
            names.submit_exchange(self.ns),
            names.SUBMIT_ROUTING_KEY,
            codec.encode(document),
            codec.MSGPACK,
            message_id,
            message_headers or None,
        )
        if reply.get("kind") == "rejected":
            raise SubmissionRejected(
                str(reply.get("reason")),
                str(reply.get("detail")),
                workflow_id=reply.get("workflow_id"),
                errors=reply.get("errors"),
            )
        accepted = Accepted.model_validate(reply)
        # The router sends the ``completed`` document to our reply queue, so waiting needs no binding.
        # A resend without on_task does not turn off what an earlier one asked for (the router keeps it).
        self._submitted[accepted.workflow_id] = on_task is not None or self._submitted.get(
            accepted.workflow_id, False
        )
        while len(self._submitted) > _SUBMITTED_MEMORY:
            self._submitted.popitem(last=False)
        if on_task is not None and not isinstance(workflow_id, str):
            await self._follow(accepted.workflow_id, on_task)
        return accepted

    async def _follow(self, workflow_id: str, on_task: TaskListener | None) -> None:
        reply = self._require()
        if on_task is not None:
            listeners = self._listeners.setdefault(workflow_id, [])
            if on_task not in listeners:
                listeners.append(on_task)
                await reply.bind(names.notify_exchange(self.ns), f"task.{workflow_id}.#")
        if workflow_id not in self._followed:
            self._followed.add(workflow_id)
            await reply.bind(names.notify_exchange(self.ns), f"workflow.{workflow_id}.*")

    async def wait(
        self, workflow_id: str, *, timeout_s: float | None = None, on_task: TaskListener | None = None
    ) -> Completed:
        """Wait until the workflow finishes and return its ``completed`` document.

        Works for workflows submitted by any client: one not submitted through this client is followed
        through ``{ns}.notify`` and asked for once, in case it finished already. ``on_task`` is called
        with each task notification; for a workflow this client did not submit with ``on_task`` (so the
        router may not send them), with the task changes read from its status every second instead.

        Raises:
            WorkflowNotFound: the router knows no such workflow.
            WaitTimeout: it did not finish within ``timeout_s``.
        """
        self._require()
        finished = self._finished.pop(workflow_id, None)
        if finished is not None:
            return finished
        future = self._waiters.get(workflow_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._waiters[workflow_id] = future
        self._wait_counts[workflow_id] += 1
        poller: asyncio.Task[None] | None = None
        try:
            if on_task is not None and not self._submitted.get(workflow_id):
                poller = asyncio.create_task(self._poll_progress(workflow_id, on_task, future))
                on_task = None
            if on_task is not None or workflow_id not in self._submitted:
                await self._follow(workflow_id, on_task)
            if workflow_id not in self._submitted:
                data = await self._about("result", workflow_id)
                if isinstance(data, dict) and data.get("kind") == "completed":
                    self._completed(Completed.model_validate(data))
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError as exc:
            raise WaitTimeout(f"workflow {workflow_id} did not finish within {timeout_s:g}s") from exc
        finally:
            if poller is not None:
                poller.cancel()
            # The last waiter forgets the workflow; a document arriving later lands in _finished.
            self._wait_counts[workflow_id] -= 1
            if self._wait_counts[workflow_id] <= 0:
                del self._wait_counts[workflow_id]
                self._waiters.pop(workflow_id, None)
                self._listeners.pop(workflow_id, None)

    async def _poll_progress(
        self, workflow_id: str, on_task: TaskListener, done: asyncio.Future[Completed]
    ) -> None:
        """Report a workflow's task changes to ``on_task`` from its status, until ``done``."""
        seen: dict[str, tuple[Any, ...]] = {}
        while not done.done():
            with contextlib.suppress(TransportError, WaitTimeout, WorkflowNotFound):
                status = await self._about("status", workflow_id)
                for task_id, task in dict(status.get("tasks") or {}).items():
                    note = {
                        "workflow_id": workflow_id,
                        "task_id": task_id,
                        "status": task.get("status"),
                        "attempts": task.get("attempts"),
                        "agent": task.get("agent"),
                        "error": task.get("error"),
                    }
                    state = (note["status"], note["attempts"], note["agent"])
                    if seen.get(task_id) != state:
                        seen[task_id] = state
                        on_task(note)
            await asyncio.wait([done], timeout=_PROGRESS_POLL_S)

    async def run(
        self,
        workflow: Submission | dict[str, Any],
        *,
        timeout_s: float | None = None,
        on_task: TaskListener | None = None,
    ) -> Completed:
        """Submit a workflow and wait for its result."""
        accepted = await self.submit(workflow, on_task=on_task)
        return await self.wait(accepted.workflow_id, timeout_s=timeout_s)

    # -- queries ----------------------------------------------------------------------------------

    async def query(self, method: str, workflow_id: str | None = None, **params: Any) -> Any:
        """Ask the router (``status``, ``result``, ``agents``, ``ping``, ``replay``); returns its ``data``."""
        request: dict[str, Any] = dict(params)
        if workflow_id is not None:
            request["workflow_id"] = workflow_id
        reply = await self._request(
            names.rpc_exchange(self.ns), method, codec.encode(request), codec.MSGPACK, None
        )
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raw, message = error.get("type"), str(error.get("message"))
            # Either vocabulary: a router of an older version names a Python class (``KeyError``).
            kind = rpc.error_type(raw)
            if kind is not None and kind.refusal:
                raise RequestRefused(message, error_type=str(kind))
            raise TransportError(f"router could not answer {method}: {kind or raw}: {message}")
        return reply.get("data")

    async def _about(self, method: str, workflow_id: str, task_id: str | None = None, **extra: Any) -> Any:
        """Ask the router about one workflow (and optionally one task); WorkflowNotFound if unknown."""
        params = dict(extra) if task_id is None else {"task_id": task_id, **extra}
        data = await self.query(method, workflow_id, **params)
        if data is None:
            raise WorkflowNotFound(workflow_id)
        return data

    async def status(self, workflow_id: str) -> dict[str, Any]:
        """The workflow's status and every task's status, attempts, agent and error.

        Raises:
            WorkflowNotFound: no such workflow.
        """
        data = await self._about("status", workflow_id)
        return dict(data)

    async def cancel(self, workflow_id: str, task_id: str | None = None) -> dict[str, Any]:
        """Cancel a workflow (or one task and everything downstream of it).

        Unfinished tasks end ``cancelled`` at once; running ones are stopped in their workers (an async
        handler is cancelled, a sync one sees ``task.is_cancelled``).

        Raises:
            WorkflowNotFound: no such workflow.
        """
        data = await self._about("cancel", workflow_id, task_id)
        return dict(data)

    async def why(self, workflow_id: str, task_id: str | None = None) -> list[dict[str, Any]]:
        """Why each unfinished task (or ``task_id``) is not running yet, or where it runs.

        Each answer has ``task_id``, ``status``, ``reason`` (``waiting_on``, ``queued``, ``no_agent``,
        ``circuit_open``, ``running_on``, ``backoff_until``, ...) and a human ``detail``.

        Raises:
            WorkflowNotFound: no such workflow.
        """
        data = await self._about("why", workflow_id, task_id)
        return list(data)

    async def replay(self, workflow_id: str, task_id: str) -> dict[str, Any]:
        """Run a dead or failed task again from attempt 1; its skipped dependents wait again.

        Raises:
            WorkflowNotFound: no such workflow.
            RequestRefused: no such task (``not_found``), or the task is not dead/failed.
        """
        data = await self._about("replay", workflow_id, task_id)
        return dict(data)

    async def resume(self, workflow_id: str, task_id: str, *, input: Any = _KEEP) -> dict[str, Any]:
        """Run an escalated task again with a fresh attempt budget (``fabric resume``).

        Args:
            workflow_id: its workflow.
            task_id: the escalated task.
            input: a new input for it (any msgpack value, None included); left out, it keeps its own.

        Raises:
            WorkflowNotFound: no such workflow.
            RequestRefused: no such task (``not_found``), or it is not escalated.

        Example:
            >>> await client.resume("wf-1", "review", input={"approved": True})
        """
        extra = {} if input is _KEEP else {"input": input}
        data = await self._about("resume", workflow_id, task_id, **extra)
        return dict(data)

    async def abort(self, workflow_id: str, task_id: str, *, reason: str | None = None) -> dict[str, Any]:
        """Give up on an escalated task (``fabric abort``): it ends ``dead`` with ``reason`` (a copy is
        parked on ``{ns}.dead``), its dependents ``upstream_failed``; the workflow ends ``failed`` when
        nothing else remains.

        Raises:
            WorkflowNotFound: no such workflow.
            RequestRefused: no such task (``not_found``), or it is not escalated.
        """
        extra = {} if reason is None else {"reason": reason}
        data = await self._about("abort", workflow_id, task_id, **extra)
        return dict(data)

    async def result(self, workflow_id: str) -> Completed | None:
        """The ``completed`` document, or None while the workflow still runs.

        Raises:
            WorkflowNotFound: no such workflow.
        """
        data = await self._about("result", workflow_id)
        if data.get("kind") == "completed":
            return Completed.model_validate(data)
        return None
