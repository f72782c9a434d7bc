"""`llmaas profile`: measure the restore cost model (recompute seconds per chunk, read seconds per byte) once.

The service measures it on first start when it is missing, and warns at each start when its points are implausible
(measured under load); this command shows it, or measures it again (--refresh), e.g. after such a warning, after
moving the data directory to another disk or to study a disk throttle.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from llmaas.kv.codec import ChunkGeometry
from llmaas.kv.spec import KVSpec
from llmaas.model.loader import load_model
from llmaas.paths import DataDir
from llmaas.restore.profiler import ensure_profile
from llmaas.storage.throttle import DiskThrottle


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmaas profile", description=__doc__)
    p.add_argument("--home", help="data directory (default: $LLMAAS_HOME or ~/.local/share/llmaas)")
    p.add_argument("--refresh", action="store_true",
                   help="measure again even if a profile is stored (best on an idle machine: other work skews it)")
    p.add_argument("--chunk-tokens", type=int, default=16, help="chunk size (default: 16)")
    p.add_argument("--max-context-tokens", type=int, default=2048,
                   help="the longest context served: recompute is measured at this length (default: 2048)")
    p.add_argument("--disk-throttle-mbps", type=float, help="SIMULATION: profile under this disk throttle (MB/s)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    args = p.parse_args(argv)
    home = DataDir.resolve(args.home).create()
    loaded = load_model()
    throttle = None if args.disk_throttle_mbps is None else DiskThrottle.from_mb_s(args.disk_throttle_mbps)
    geometry = ChunkGeometry(KVSpec.from_config(loaded.config), args.chunk_tokens)
    profile = ensure_profile(loaded.model, geometry, loaded.model_id, home.kv_dir / "profiles", throttle,
                             args.max_context_tokens, refresh=args.refresh)
    if args.json:
        print(json.dumps(asdict(profile), indent=2))
        return 0
    re, io = profile.recompute, profile.io
    print(f"restore profile for {profile.model_id}, {profile.codec}, throttle {profile.throttle} "
          f"(measured {profile.created_at} at {profile.context_tokens} tokens)")
    print(f"  recompute: {re.intercept_s * 1e3:.2f} ms + {re.slope_s * 1e3:.2f} ms/chunk (R^2 {re.r2:.3f}, "
          f"max residual {re.max_abs_residual_s * 1e3:.2f} ms)")
    print(f"  read:      {io.intercept_s * 1e3:.2f} ms + {io.slope_s * 2**20 * 1e3:.3f} ms/MiB (R^2 {io.r2:.3f}, "
          f"max residual {io.max_abs_residual_s * 1e3:.2f} ms)")
    return 0
