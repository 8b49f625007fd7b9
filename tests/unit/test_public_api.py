"""The public surface: `fabric.__all__` is pinned, and the example workers use nothing else."""

from __future__ import annotations

import ast
from pathlib import Path

import fabric

DEMO = Path(__file__).resolve().parents[2] / "workers" / "demo.py"

PUBLIC_API = [
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


def test_all_is_pinned() -> None:
    assert sorted(PUBLIC_API) == PUBLIC_API
    assert fabric.__all__ == PUBLIC_API


def test_every_public_name_resolves() -> None:
    namespace: dict[str, object] = {}
    exec("from fabric import *", namespace)

    for name in PUBLIC_API:
        assert getattr(fabric, name) is namespace[name], name
    assert isinstance(fabric.__version__, str)


def test_errors_share_one_root() -> None:
    errors = [getattr(fabric, name) for name in PUBLIC_API if name.endswith("Error")]
    errors += [
        fabric.SubmissionRejected,
        fabric.TopologyMismatch,
        fabric.WorkflowNotFound,
        fabric.WaitTimeout,
    ]
    errors += [fabric.Retry, fabric.Reassign, fabric.Escalate, fabric.Abort]

    assert all(issubclass(error, fabric.FabricError) for error in errors)
    assert issubclass(fabric.ConfigError, ValueError)


def test_demo_worker_imports_only_the_public_api() -> None:
    tree = ast.parse(DEMO.read_text(), filename=str(DEMO))
    fabric_imports: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] != "fabric" or alias.name == "fabric", alias.name
                if alias.name == "fabric":
                    fabric_imports.append(("fabric", []))
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "workers/demo.py must not use relative imports"
            module = node.module or ""
            if module.split(".")[0] == "fabric":
                assert module == "fabric", f"workers/demo.py imports from {module}"
                names = [alias.name for alias in node.names]
                fabric_imports.append((module, names))
                assert set(names) <= set(PUBLIC_API), names

    assert fabric_imports, "workers/demo.py should use the fabric API"
