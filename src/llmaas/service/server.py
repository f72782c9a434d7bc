"""The service process: one per data directory, one resident model, one compute thread, HTTP on sockets.

Owns the lifecycle: take the data directory's lock (a second service on it fails clearly), open the catalogue, load
the model, start the engine, listen on the Unix socket (always; mode 0600) and on TCP when a port is given (127.0.0.1
unless another host is named explicitly), and shut all of it down in order. Ignores what the routes do.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import uvicorn

from llmaas.engine.worker import Engine, EngineConfig
from llmaas.errors import LlmaasError
from llmaas.model.loader import LoadedModel, load_model
from llmaas.service.app import create_app
from llmaas.service.state import ServiceState
from llmaas.storage.catalog import Catalog
from llmaas.storage.paths import DataDir

log = logging.getLogger("llmaas.service")
UNIX_PATH_MAX = 107


class ServiceError(LlmaasError):
    """The service cannot start (data directory in use, socket path unusable, port taken)."""


@dataclass(frozen=True)
class ServeOptions:
    home: DataDir
    model: Path | None = None
    port: int | None = None
    host: str = "127.0.0.1"
    engine: EngineConfig = field(default_factory=EngineConfig)
    threads: int | None = None


class Service:
    def __init__(self, options: ServeOptions, loaded: LoadedModel | None = None) -> None:
        self.options = options
        self.home = options.home.create()
        self._lock_file = _take_lock(self.home)
        try:
            if options.threads is not None:
                torch.set_num_threads(options.threads)
            self.catalog = Catalog(self.home.catalog)
            self.loaded = loaded if loaded is not None else load_model(options.model)
            self.engine = Engine(self.loaded, self.catalog, options.engine)
            self.state = ServiceState(self.catalog, self.engine, model_id(self.loaded), int(time.time()))
            self.sockets = [_unix_socket(self.home.socket)]
            if options.port is not None:
                self.sockets.append(_tcp_socket(options.host, options.port))
        except BaseException:
            self._lock_file.close()
            raise
        config = uvicorn.Config(create_app(self.state), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=3)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        return self.sockets[1].getsockname()[1] if len(self.sockets) > 1 else None

    def describe(self) -> str:
        where = [f"unix:{self.home.socket}"] + ([f"http://{self.options.host}:{self.port}"] if self.port else [])
        return f"llmaas: serving {self.state.model_id} on {' and '.join(where)} (data in {self.home.root})"

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
                raise ServiceError("the HTTP server failed to start; see the log")
            time.sleep(0.01)

    def close(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.engine.stop()
        self.engine.close()
        self.catalog.close()
        for s in self.sockets:
            s.close()
        self.home.socket.unlink(missing_ok=True)
        self._lock_file.close()


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
        raise ServiceError(f"another llmaas service (pid {owner}) is using {home.root}; stop it, or start this one "
                           "with --home DIR (or LLMAAS_HOME) for a separate data directory") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def _unix_socket(path: Path) -> socket.socket:
    if len(str(path)) > UNIX_PATH_MAX:
        raise ServiceError(f"socket path {path} is longer than the {UNIX_PATH_MAX} bytes Unix sockets allow; use a "
                           "shorter --home")
    path.unlink(missing_ok=True)  # left by a killed service: we hold the lock, so nobody else is serving it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    return sock


def _tcp_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServiceError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from exc
    return sock
