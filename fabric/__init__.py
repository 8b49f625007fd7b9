"""fabric: a reliable, observable worker fabric for AI agents over RabbitMQ."""

from __future__ import annotations

from fabric.client.client import FabricClient
from fabric.errors import (
    Abort,
    ConfigError,
    Escalate,
    FabricError,
    NotConnectedError,
    ProtocolError,
    PublishError,
    Reassign,
    RequestRefused,
    Retry,
    StoreError,
    SubmissionRejected,
    TopologyMismatch,
    TransportError,
    WaitTimeout,
    WorkflowNotFound,
)
from fabric.protocol.messages import (
    Accepted,
    Completed,
    Rejected,
    RejectReason,
    Submission,
    TaskSpec,
    TaskStatus,
    WorkflowStatus,
)
from fabric.settings import FabricSettings, load_settings
from fabric.worker.agent import Agent, Task

__version__ = "0.1.0"

__all__ = [
    "Abort",
    "Accepted",
    "Agent",
    "Completed",
    "ConfigError",
    "Escalate",
    "FabricClient",
    "FabricError",
    "FabricSettings",
    "NotConnectedError",
    "ProtocolError",
    "PublishError",
    "Reassign",
    "RejectReason",
    "Rejected",
    "RequestRefused",
    "Retry",
    "StoreError",
    "Submission",
    "SubmissionRejected",
    "Task",
    "TaskSpec",
    "TaskStatus",
    "TopologyMismatch",
    "TransportError",
    "WaitTimeout",
    "WorkflowNotFound",
    "WorkflowStatus",
    "__version__",
    "load_settings",
]
