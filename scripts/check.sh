#!/usr/bin/env bash
# The project's checks, as CI runs them (after scripts/setup.sh): lint, types where bookkeeping bugs live, then the
# tests (extra arguments go to pytest). Each step stops the run on failure, with the tool's own report.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== ruff"
.venv/bin/ruff check src tests scripts
echo "== mypy (kv, storage, memory, restore)"
.venv/bin/mypy src/llmaas/kv src/llmaas/storage src/llmaas/memory src/llmaas/restore
echo "== pytest"
.venv/bin/python -m pytest -q "$@"
