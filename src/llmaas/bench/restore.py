"""`llmaas bench restore`: cold switch latency of one long context restored from disk, ours vs llama.cpp's own.

Owns the run: one context of N WikiText-2 tokens is built through the LLMS store (prefill with attention tracking,
chunking, re-leveling, ahead-of-time write-back), evicted, and restored cold several times; the plan, its floor (a
cold sequential read of exactly the bytes read, or the planned pipeline time when recompute is used) and the
timeline are reported. The peer is llama.cpp's raw per-sequence state get/set through a file on the same disk, cold.
Ours, the floor and the peer are measured in rounds, one of each per round, so a drifting disk weighs on all three
alike. Ignores multi-context traces (`llmaas bench switch`).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from llmaas.bench.disk import FloorProbe, measure_disk
from llmaas.bench.engine import WIKITEXT
from llmaas.bench.results import machine, write_json
from llmaas.engine.generate import Generator
from llmaas.kv.codec import ChunkGeometry, KVLevel
from llmaas.kv.spec import KVSpec
from llmaas.memory.policy import POLICIES
from llmaas.memory.restorer import SwitchReport
from llmaas.memory.store import ChunkedKVStore, MemoryConfig
from llmaas.model.loader import load_model
from llmaas.restore.profiler import ensure_profile
from llmaas.storage.throttle import DiskThrottle


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmaas bench restore", description=__doc__)
    p.add_argument("--tokens", type=int, default=2048, help="context length (default: 2048)")
    p.add_argument("--policy", default="llms", choices=sorted(POLICIES), help="memory policy (default: llms)")
    p.add_argument("--peer", action="append", default=[], choices=["llama-cpp"], help="also measure llama.cpp")
    p.add_argument("--repeats", type=int, default=5, help="cold restores, median reported (default: 5)")
    p.add_argument("--dir", type=Path, help="directory for chunk files and the peer's state file (default: a "
                                            "temporary directory under ~/.cache/llmaas, on the same disk for both, "
                                            "removed afterwards)")
    p.add_argument("--disk-throttle-mbps", type=float, help="SIMULATION: throttle our chunk IO to this many MB/s")
    p.add_argument("--kv-decode", default="auto", choices=["auto", "avx2", "avx512"],
                   help="the native KV decode's instruction set (default: auto, the CPU's best; `llmaas info` shows "
                        "which)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the results here")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from llmaas.paths import cache_dir

    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-restore-", dir=cache_dir()))
    root.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, root)
    finally:
        if args.dir is None:  # its own temporary directory (chunk files, the peer's state, ~100 MB): not left behind
            shutil.rmtree(root, ignore_errors=True)


def _run(args: argparse.Namespace, root: Path) -> int:
    loaded = load_model()
    if loaded.model.kernels is not None:
        try:
            loaded.model.kernels.set_kv_decode_isa(args.kv_decode)
        except RuntimeError as exc:
            raise SystemExit(f"llmaas bench restore: --kv-decode {args.kv_decode}: {exc}") from exc
    ids = loaded.tokenizer.encode(WIKITEXT.read_text()[:40_000], add_bos=False, parse_special=False)[:args.tokens]
    throttle = None if args.disk_throttle_mbps is None else DiskThrottle.from_mb_s(args.disk_throttle_mbps)
    result = {"config": {"tokens": len(ids), "policy": args.policy, "repeats": args.repeats,
                         "throttle": throttle.describe() if throttle else "unthrottled", "dir": str(root),
                         "kv_decode": loaded.model.kernels.kv_decode_isa() if loaded.model.kernels else "PyTorch",
                         "interleaved": True},
              "machine": machine()}
    policy = POLICIES[args.policy]
    ours = OurRestore(loaded, ids, root, policy, throttle)
    peer = None
    try:
        nbytes = ours.restore().bytes_read  # the first restore warms code paths and is not counted
        if "llama-cpp" in args.peer:
            from llmaas.bench.restore_peer import PeerRestore

            peer = PeerRestore(ids, root, saves=args.repeats)
        # One round = our cold restore, a cold sequential read of exactly our bytes (the floor), llama.cpp's cold
        # load: this VM's disk drifts by 1.5x within a minute, and measured one after the other the three saw
        # different disks.
        floor_s: list[float] = []
        with FloorProbe(root, nbytes) as probe:
            for i in range(1, args.repeats + 1):
                report = ours.restore()
                floor_s.append(probe.read_s())
                line = (f"round {i}/{args.repeats}: ours {report.switch_s * 1e3:.1f} ms "
                        f"({report.bytes_read / 2**20:.1f} MiB, {report.recomputed_chunks} chunks recomputed), "
                        f"floor {floor_s[-1] * 1e3:.1f} ms")
                if peer is not None:
                    line += f", llama.cpp {peer.load()['load_s'] * 1e3:.1f} ms"
                _progress(line)
        result["ours"] = ours.summary()
        result["ours"]["resident_decode_s"] = ours.resident_decode_s(max(20, args.repeats))
        if peer is not None:
            result["peers"] = {"llama_cpp": peer.finish()}
    finally:
        ours.close()
        if peer is not None:
            peer.close()
    if policy.restore == "pipeline":  # LLMS §11.8: a mixed plan must not lose to either pure one by more than 10%
        for mode in ("io", "recompute"):
            _progress(f"the same context restored by {mode} only, for comparison")
            alt = OurRestore(loaded, ids, root, policy.with_settings(restore=mode), throttle)
            try:
                alt.restore()
                for _ in range(min(3, args.repeats)):
                    alt.restore()
                result["ours"][f"all_{mode}_s"] = statistics.median(r.switch_s for r in alt.runs[1:])
            finally:
                alt.close()
        best = min(result["ours"]["all_io_s"], result["ours"]["all_recompute_s"])
        result["ours"]["vs_best_pure_plan"] = result["ours"]["switch_s"] / best
    disk = measure_disk(root, file_bytes=nbytes, random_requests=min(200, nbytes // (180 * 1024)), repeats=9)
    result["disk"] = {**disk.to_json(), "describe": disk.describe()}
    ours_json = result["ours"]
    io_floor = statistics.median(floor_s)
    if throttle is not None and throttle.bandwidth_bytes_per_s:
        io_floor = max(io_floor, nbytes / throttle.bandwidth_bytes_per_s)
    ours_json["floor_s_all"] = floor_s
    ours_json["floor_s"] = max(io_floor, ours_json["plan"]["predicted_recompute_s"]) \
        if ours_json["recomputed_tokens"] else io_floor
    ours_json["vs_floor"] = ours_json["switch_s"] / ours_json["floor_s"] if ours_json["floor_s"] else None
    result.setdefault("peers", {})
    if "llama_cpp" in result["peers"]:
        ours_json["speedup_vs_llama_cpp"] = result["peers"]["llama_cpp"]["load_s"] / ours_json["switch_s"]
    print_table(result)
    if args.json:
        write_json(result, args.json)
    return 0


class OurRestore:
    """One context of the caller's ids built through the LLMS store (prefill with attention tracking, chunking,
    re-leveling, ahead-of-time write-back); restore() evicts it whole and restores it cold (the chunk log reads
    past the page cache, or drops what it read)."""

    def __init__(self, loaded, ids: list[int], root: Path, policy, throttle: DiskThrottle | None) -> None:
        spec = KVSpec.from_config(loaded.config)
        geometry = ChunkGeometry(spec, policy.chunk_tokens)
        self.profile = None
        if policy.restore == "pipeline":
            self.profile = ensure_profile(loaded.model, geometry, loaded.model_id, root / "profiles", throttle,
                                          len(ids))
        budget = 2 * ChunkedKVStore.minimum_budget_bytes(geometry, policy, len(ids))
        self.ids = ids
        self.store = ChunkedKVStore(loaded.model, MemoryConfig(policy, budget, root / "kv", loaded.model_id,
                                                               len(ids), throttle), self.profile)
        self.store.drop("bench")
        self.store.writer.wait_idle()
        _progress(f"building a {len(ids)}-token context (prefill with attention tracking)")
        cache = self.store.acquire("bench", [], len(ids))
        Generator(loaded.model, loaded.tokenizer).prefill(ids, cache)
        self.store.release("bench", ids)
        self.store.writer.wait_idle()
        self.levels = [c.level for c in self.store._contexts["bench"].chunks]
        self.runs: list[SwitchReport] = []

    def restore(self) -> SwitchReport:
        self.store.reclaim(self.store.budget_bytes)
        self.store.acquire("bench", self.ids, len(self.ids))
        report = self.store.last_switch
        self.store.release("bench", self.ids)
        self.runs.append(report)
        return report

    def resident_decode_s(self, repeats: int) -> float:
        """Median seconds to decode the whole context from its resident chunks into the working KV: the work of a
        switch to a context whose chunks all stayed in memory (nothing read, nothing recomputed)."""
        self.store.acquire("bench", self.ids, len(self.ids))  # every chunk resident, and the context locked
        try:
            chunks = self.store._contexts["bench"].chunks
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                self.store.restorer.decode_resident(chunks)
                times.append(time.perf_counter() - t0)
            return statistics.median(times[1:])  # the first warms the caches
        finally:
            self.store.release("bench", self.ids)

    def summary(self) -> dict:
        """Medians over the restores after the first (which warms code paths)."""
        runs = self.runs[1:]
        best = sorted(runs, key=lambda r: r.switch_s)[len(runs) // 2]
        plan = {"loaded_chunks": best.loaded_chunks, "recomputed_chunks": best.recomputed_chunks,
                "predicted_s": best.predicted_s, "predicted_recompute_s": 0.0}
        if self.profile is not None:
            plan["predicted_recompute_s"] = self.profile.recompute.predict(best.recomputed_chunks)
        levels = self.levels
        return {"switch_s": statistics.median(r.switch_s for r in runs), "switch_s_all": [r.switch_s for r in runs],
                "restore_s": statistics.median(r.restore_s for r in runs), "bytes_read": best.bytes_read,
                "recomputed_tokens": best.recomputed_tokens, "plan": plan,
                "levels": {lv.name: levels.count(lv) for lv in KVLevel if levels.count(lv)},
                "timeline": [vars(s) for s in best.timeline]}

    def close(self) -> None:
        self.store.drop("bench")
        self.store.close()


def print_table(result: dict) -> None:
    ours = result["ours"]
    print(f"\ncold restore of a {result['config']['tokens']}-token context ({result['config']['throttle']}; "
          f"disk: {result['disk'].get('describe', '')})")
    print(f"{'system':<22}{'switch/load ms':>16}{'MiB read':>10}{'floor ms':>10}")
    print(f"{'llmaas ' + result['config']['policy']:<22}{ours['switch_s'] * 1e3:>16.1f}"
          f"{ours['bytes_read'] / 2**20:>10.1f}{ours['floor_s'] * 1e3:>10.1f}")
    for name, peer in result["peers"].items():
        print(f"{name:<22}{peer['load_s'] * 1e3:>16.1f}{peer['bytes'] / 2**20:>10.1f}{'':>10}")
    if "vs_best_pure_plan" in ours:
        print(f"same context, IO only: {ours['all_io_s'] * 1e3:.1f} ms; recompute only: "
              f"{ours['all_recompute_s'] * 1e3:.1f} ms; the plan used takes {ours['vs_best_pure_plan']:.2f}x the "
              "better of the two")
    if "speedup_vs_llama_cpp" in ours:
        print(f"ours is {ours['speedup_vs_llama_cpp']:.2f}x faster than llama.cpp")
    print(f"ours takes {ours['vs_floor']:.2f}x its floor")
    print(f"a hot switch's decode (all chunks resident, {result['config']['kv_decode']}): "
          f"{ours['resident_decode_s'] * 1e3:.2f} ms")


def _progress(line: str) -> None:
    print(f"bench restore: {line}", file=sys.stderr, flush=True)
