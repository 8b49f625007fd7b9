"""A throwaway RabbitMQ node with settings of its own (a short ``consumer_timeout``), for fault tests.

It runs the installed ``rabbitmq-server`` (the Debian package puts the real script in
``/usr/lib/rabbitmq/bin``; ``/usr/sbin/rabbitmq-server`` would ``su`` to the rabbitmq user) as a child
process with its own node name, ports, data, logs, ``HOME`` (so the Erlang cookie is its own, also
under root) and no plugins, and stops it afterwards. The local broker is never touched.

RabbitMQ 3.10 checks ``consumer_timeout`` on the channel tick (``channel_tick_interval``, 60 s by
default, in ``advanced.config``), so the node also gets a short tick: a delivery left unacked past the
timeout closes its channel within ``timeout + tick``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

#: Where the Debian/Ubuntu package keeps the server script that runs as the calling user.
_DEBIAN_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
#: The AMQP 0-9-1 protocol header; a broker that is up answers it with connection.start.
_AMQP_HEADER = b"AMQP\x00\x00\x09\x01"


class BrokerNodeError(RuntimeError):
    """The node could not be started; the message says why and shows the end of its log."""


def find_server() -> str | None:
    """The ``rabbitmq-server`` script to run: ``$FABRIC_TEST_RABBITMQ_SERVER``, the Debian location, or
    the one on ``PATH``."""
    explicit = os.environ.get("FABRIC_TEST_RABBITMQ_SERVER")
    if explicit:
        return explicit
    if os.access(_DEBIAN_SERVER, os.X_OK):
        return _DEBIAN_SERVER
    return shutil.which("rabbitmq-server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BrokerNode:
    """A RabbitMQ node in ``base`` with the given ``consumer_timeout``. Use as a context manager.

    Example:
        >>> with BrokerNode(tmp_path, consumer_timeout_ms=2000) as node:
        ...     url = node.url
    """

    def __init__(
        self,
        base: Path,
        *,
        consumer_timeout_ms: int,
        channel_tick_ms: int = 500,
        start_timeout_s: float = 90.0,
    ) -> None:
        self.base = base
        self.consumer_timeout_ms = consumer_timeout_ms
        self.channel_tick_ms = channel_tick_ms
        self.start_timeout_s = start_timeout_s
        self.port = _free_port()
        self.dist_port = _free_port()
        self.nodename = f"fabric-ct-{os.getpid()}-{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.log_path = base / "server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> BrokerNode:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        server = find_server()
        if server is None:
            raise BrokerNodeError(
                "rabbitmq-server is not installed (apt-get install rabbitmq-server, or set "
                "FABRIC_TEST_RABBITMQ_SERVER to its path)"
            )
        base = self.base
        (base / "home").mkdir(parents=True, exist_ok=True)
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nconsumer_timeout = {self.consumer_timeout_ms}\n"
        )
        (base / "advanced.config").write_text(
            f"[{{rabbit, [{{channel_tick_interval, {self.channel_tick_ms}}}]}}].\n"
        )
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("")
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            # Its own HOME: Erlang writes a fresh cookie there (root's or rabbitmq's is never read).
            "HOME": str(base / "home"),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(base / "plugins-expand"),
            "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
        }
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [server],
                env=env,
                cwd=base,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its Erlang helpers are stopped with it (one process group)
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise BrokerNodeError(
                    f"rabbitmq-server ({self.nodename}) exited with code {code} while starting\n"
                    + self.log_tail()
                )
            if self._answers_amqp():
                return
            time.sleep(0.2)
        raise BrokerNodeError(
            f"rabbitmq-server ({self.nodename}) did not accept AMQP on port {self.port} within "
            f"{self.start_timeout_s:g}s\n{self.log_tail()}"
        )

    def _answers_amqp(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(_AMQP_HEADER)
                frame = sock.recv(7)
        except OSError:
            return False
        return len(frame) == 7 and frame[0] == 1  # a method frame: connection.start

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's output and of its log file, for error messages."""
        parts = []
        for path in [self.log_path, *sorted((self.base / "log").glob("*.log"))]:
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop the node (SIGTERM: RabbitMQ shuts down cleanly), killing it after 30 s."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        # Erlang helpers (erl_child_setup, inet_gethost) may outlive the VM by a moment.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
