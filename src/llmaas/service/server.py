"""The service process: one per data directory, one resident model, one compute thread, HTTP on sockets.

Owns the lifecycle: take the data directory's lock (a second service on it fails clearly), listen on the Unix socket
(always; mode 0600) and on TCP when a port is given (127.0.0.1 unless another host is named explicitly) before anything
slow, so that a taken port fails in well under a second; then open the catalogue, load the model, start the engine,
serve, and shut all of it down in order. Reports each start-up step to a caller's `progress`. Ignores what the routes
do.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from llmaas.elastic.artifact import elastic_dir
from llmaas.elastic.model_levels import MODEL_LEVELS, model_level_name
from llmaas.elastic.runtime import PREPARE, ElasticRuntime
from llmaas.engine.cpu_governor import apply_threads
from llmaas.engine.worker import NO_ELASTIC, Engine, EngineConfig
from llmaas.errors import ElasticUnavailableError, ServiceStartError
from llmaas.model.loader import LoadedModel, load_model
from llmaas.paths import DataDir
from llmaas.service.app import create_app
from llmaas.service.state import ServiceState
from llmaas.storage.catalog import Catalog

log = logging.getLogger("llmaas.service")
UNIX_PATH_MAX = 107


@dataclass(frozen=True)
class ServeOptions:
    home: DataDir
    model: Path | None = None
    port: int | None = None
    host: str = "127.0.0.1"
    engine: EngineConfig = field(default_factory=EngineConfig)
    threads: int | str | None = None  # a count, cpu_governor.AUTO, or None: torch's default (one per core)
    elastic: bool = False  # serve ElastiLM's SLO requests (needs `llmaas elastic prepare`)
    elastic_dir: Path | None = None  # default: the model's cache directory


class Service:
    def __init__(self, options: ServeOptions, loaded: LoadedModel | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        """Listen first, then load the model (unless `loaded` is given) and build the engine, which measures the
        restore profile on a first start. Connections that arrive meanwhile wait in the sockets' listen backlog
        until the HTTP server starts. `progress` gets one line per start-up step (the CLI prints them)."""
        self.options = options
        self._progress = progress or (lambda _line: None)
        self.home = options.home.create()
        with ExitStack() as cleanup:  # on failure, undo what was set up, in reverse; on success, close() does
            self._lock_file = cleanup.enter_context(_take_lock(self.home))
            cleanup.callback(self.home.socket.unlink, missing_ok=True)
            self.sockets = [cleanup.enter_context(_unix_socket(self.home.socket))]
            if options.port is not None:
                self.sockets.append(cleanup.enter_context(_tcp_socket(options.host, options.port)))
            self._progress(f"listening on {self._addresses()}; calls wait until the model is ready")
            apply_threads(options.threads)
            self.catalog = Catalog(self.home.catalog)
            cleanup.callback(self.catalog.close)
            if loaded is None:
                self._progress(f"loading {options.model or 'the bundled model'}...")
                loaded = load_model(options.model)
            self.loaded = loaded
            elastic = self._open_elastic() if options.elastic else NO_ELASTIC
            self._progress("starting the engine...")
            self.engine = Engine(self.loaded, self.catalog, options.engine, elastic)
            cleanup.callback(self.engine.close)
            self.state = ServiceState(self.catalog, self.engine, model_id(self.loaded), int(time.time()))
            self._resources = cleanup.pop_all()
        config = uvicorn.Config(create_app(self.state), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=3)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def _open_elastic(self) -> ElasticRuntime | ElasticUnavailableError:
        """The elastic runtime over the resident model (reordered in place, once), or, when its artifacts are not
        built, the error every elastic request will answer, which names the command that builds them."""
        directory = self.options.elastic_dir or elastic_dir(self.loaded.model_id)
        self._progress(f"opening the elastic sub-models from {directory}...")
        try:
            runtime = ElasticRuntime.open(self.loaded, directory)
        except ElasticUnavailableError as exc:
            self._progress(f"warning: {exc}; until then elastic requests are refused")
            return exc
        missing = [m for m in MODEL_LEVELS[:-1] if m not in runtime.elastic.adapters]
        if missing:
            self._progress(f"warning: levels {', '.join(model_level_name(m) for m in missing)} have no LoRA adapter "
                           f"(they run unrecovered); `{PREPARE}` trains them")
        return runtime

    @property
    def port(self) -> int | None:
        return self.sockets[1].getsockname()[1] if len(self.sockets) > 1 else None

    def describe(self) -> str:
        return f"serving {self.state.model_id} on {self._addresses()} (data in {self.home.root})"

    def _addresses(self) -> str:
        where = [f"unix:{self.home.socket}"] + ([f"http://{self.options.host}:{self.port}"] if self.port else [])
        return " and ".join(where)

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM: HTTP on a background thread, the engine on this (the main) thread, the one
        that loaded the model."""
        log.info("start", extra={"fields": {"model": self.state.model_id, "home": str(self.home.root),
                                            "port": self.port}})
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.engine.stop())
        self._start_http()
        try:
            self.engine.run()
        finally:
            self.close()

    def start_background(self) -> Service:
        """Serve HTTP and the engine from background threads (tests, in-process benchmarks); stop with close()."""
        self.engine.start()
        self._start_http()
        return self

    def _start_http(self) -> None:
        # uvicorn installs signal handlers only on the main thread: here the engine's loop owns the signals
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": self.sockets}, daemon=True,
                                        name="llmaas-http")
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise ServiceStartError("the HTTP server failed to start; see the log")
            time.sleep(0.01)
        self._progress(f"ready: {self.describe()}")

    def close(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.engine.stop()
        self._resources.close()  # the engine's KV store, the catalogue, the sockets and their file, the lock


def model_id(loaded: LoadedModel) -> str:
    """The name clients use for the resident model: its file name without .gguf."""
    return loaded.path.name.removesuffix(".gguf")


def _take_lock(home: DataDir):
    lock = open(home.lock, "a+")  # noqa: SIM115 (held open for the service's lifetime)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "unknown"
        lock.close()
        raise ServiceStartError(f"another llmaas service (pid {owner}) is using {home.root}; stop it, or start this "
                                "one with --home DIR (or LLMAAS_HOME) for a separate data directory") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def _unix_socket(path: Path) -> socket.socket:
    if len(str(path)) > UNIX_PATH_MAX:
        raise ServiceStartError(f"socket path {path} is longer than the {UNIX_PATH_MAX} bytes Unix sockets allow; "
                                "use a shorter --home")
    path.unlink(missing_ok=True)  # left by a killed service: we hold the lock, so nobody else is serving it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen()
    except OSError as exc:
        sock.close()
        raise ServiceStartError(f"cannot listen on {path} ({exc.strerror}); check the data directory's "
                                "permissions") from exc
    return sock


def _tcp_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen()  # here, not when uvicorn starts: early connections wait in the backlog instead of being refused
    except OSError as exc:
        sock.close()
        raise ServiceStartError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from exc
    return sock
