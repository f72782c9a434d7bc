"""Where a service keeps its state: the data directory and the files in it.

Owns the layout only: `$LLMAAS_HOME` (default `~/.local/share/llmaas`) holds the SQLite catalogue, the KV files, the
Unix socket, the single-instance lock and the logs. Ignores what is in those files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataDir:
    root: Path

    @classmethod
    def resolve(cls, home: str | Path | None = None) -> DataDir:
        """`home`, else $LLMAAS_HOME, else ~/.local/share/llmaas (XDG_DATA_HOME respected)."""
        if home is None:
            home = os.environ.get("LLMAAS_HOME")
        if home is None:
            home = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "llmaas"
        return cls(Path(home).expanduser().resolve())

    def create(self) -> DataDir:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.kv_dir.mkdir(exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        return self

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.sqlite3"

    @property
    def socket(self) -> Path:
        return self.root / "llmaas.sock"

    @property
    def lock(self) -> Path:
        return self.root / "service.lock"

    @property
    def kv_dir(self) -> Path:
        return self.root / "kv"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def chat_history(self) -> Path:
        """`llmaas chat`'s line history (mode 0600)."""
        return self.root / "chat_history"

    @property
    def terminal_key(self) -> Path:
        """The key `llmaas chat` registers for itself on first use (mode 0600)."""
        return self.root / "terminal.key"
