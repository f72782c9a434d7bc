"""`llmaas serve`: run the service (one resident model, persistent contexts) on this data directory."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from llmaas.cli.common import fraction_arg, threads_arg
from llmaas.engine.cpu_governor import AUTO
from llmaas.engine.worker import EngineConfig
from llmaas.memory.policy import POLICIES
from llmaas.paths import DataDir
from llmaas.service.logs import setup_logging
from llmaas.service.server import ServeOptions, Service
from llmaas.storage.faults import DiskFaults
from llmaas.storage.throttle import DiskThrottle


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmaas serve", description=__doc__)
    p.add_argument("--home", help="data directory (default: $LLMAAS_HOME or ~/.local/share/llmaas)")
    p.add_argument("--model", type=Path, help="a llama-architecture GGUF (default: the bundled SmolLM2-135M)")
    p.add_argument("--port", type=int, help="also listen on TCP (default: the Unix socket only)")
    p.add_argument("--host", default="127.0.0.1",
                   help="TCP address (default: 127.0.0.1; another host exposes the service beyond this device)")
    p.add_argument("--kv-budget-mb", type=float,
                   help="memory for contexts' KV chunks, MiB (default: two maximum-length contexts at INT8, 48.5 MiB "
                        "for SmolLM2 at 2048 tokens)")
    p.add_argument("--kv-policy", default="llms", choices=sorted(POLICIES),
                   help="context memory policy: LLMS, an ablation or a baseline of the paper (default: llms)")
    p.add_argument("--max-context-tokens", type=int, default=2048, help="longest context (default: 2048)")
    p.add_argument("--disk-throttle-mbps", type=float,
                   help="SIMULATION: limit KV disk reads and writes to this many MB/s, to study slower flash "
                        "(default: off)")
    p.add_argument("--inject-disk-faults", type=fraction_arg, metavar="RATE",
                   help="TEST SEAM for `llmaas check reliability`: this fraction of KV chunk writes, and of their "
                        "fsyncs, fail with EIO (default: off; never in production)")
    p.add_argument("--max-queue", type=int, default=64, help="calls that may wait before 429 (default: 64)")
    p.add_argument("--threads", type=threads_arg, default=AUTO, metavar="N|auto",
                   help="compute threads, or auto: the cores other processes leave idle, re-decided while serving, "
                        "so a busy device slows the service down instead of stalling it (default: auto)")
    p.add_argument("--quiet", action="store_true", help="log to the data directory only, not stderr")
    p.add_argument("--elastic", action="store_true",
                   help="serve requests with an SLO on elastic sub-models (ElastiLM); build them first with "
                        "`llmaas elastic prepare`")
    p.add_argument("--elastic-dir", type=Path, help="elastic artifacts (default: the model's cache directory)")
    args = p.parse_args(argv)
    if args.port is not None and not 0 <= args.port <= 65535:
        p.error("--port must be in 0..65535")
    if not _is_loopback(args.host):
        _say(f"warning: listening on {args.host} makes the service reachable from other hosts")
    home = DataDir.resolve(args.home).create()
    log_path = setup_logging(home.log_dir, quiet=args.quiet)
    budget = None if args.kv_budget_mb is None else int(args.kv_budget_mb * 2**20)
    throttle = None if args.disk_throttle_mbps is None else DiskThrottle.from_mb_s(args.disk_throttle_mbps)
    engine = EngineConfig(kv_budget_bytes=budget, max_pending=args.max_queue, memory=POLICIES[args.kv_policy],
                          max_context_tokens=args.max_context_tokens, throttle=throttle,
                          faults=None if args.inject_disk_faults is None else
                          DiskFaults(args.inject_disk_faults, args.inject_disk_faults))
    _say(f"starting; logs in {log_path}")
    options = ServeOptions(home, args.model, args.port, args.host, engine, args.threads, args.elastic,
                           args.elastic_dir)
    service = Service(options, progress=_say)
    service.run()
    return 0


def _say(line: str) -> None:
    """Start-up steps as plain lines on stderr, even with --quiet (which silences the JSON logs): a first start takes
    about a minute, and the user should see why and when it is ready."""
    print(f"llmaas serve: {line}", file=sys.stderr, flush=True)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
