"""The test kit of fabric: an in-memory broker that behaves as RabbitMQ does where fabric relies on it.

:class:`MemoryBroker` passes the same transport contract suite as the RabbitMQ adapter
(``tests/contract/test_transport.py``), so logic above the transport (routing a workflow's tasks,
retries through the delay queues, dead-lettering, priorities) can be tested in process, fast.

Example:
    >>> from fabric.testing import MemoryBroker
    >>> broker = MemoryBroker()
    >>> async with broker.connection(name="test") as transport:
    ...     await transport.declare(spec.build("ns", ["echo"]))
    ...     await transport.publish("ns.tasks", "echo", b"body")
    ...     assert (await transport.queue_info("ns.cap.echo")).messages == 1
"""

from __future__ import annotations

from fabric.transport.memory import MemoryBroker
from fabric.transport.memory_connection import MemoryConnection
from fabric.transport.memory_consumer import MemoryConsumer, MemoryDelivery

__all__ = ["MemoryBroker", "MemoryConnection", "MemoryConsumer", "MemoryDelivery"]
