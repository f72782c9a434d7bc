"""The disk-fault campaign: failing writes, corrupt chunk files, a truncated catalogue WAL, a full disk and a
read-only data directory, each under a live `llmaas serve`, judged against an uninterrupted twin.

Owns the faults and the judgement. Every phase runs three conversations (greedy, short replies) on its own service
with exact KV (`llms-lossless`, or `vllm-s` where no restore profile may be written) and a KV budget of about one
context, so calls evict, write and restore all the time. A fault-free twin service answers the same turns; a reply
that differs from the twin's is a silent corruption (the goal is 0: a fault may cost recompute or a clear error,
never a wrong answer).
1. **Write errors**: `serve --inject-disk-faults 0.3` (the chunk log's seam: 30% of chunk writes and of their fsyncs
   fail with EIO). No call may fail: a chunk that cannot be written is evicted unwritten and recomputed.
2. **Corrupt chunk files**: after a clean stop, one byte flipped in the middle of every segment file and the
   largest one cut to half. After a restart every context must continue as the twin: detected, rebuilt, never served.
3. **Truncated WAL**: `kill -9`, then the catalogue's write-ahead log cut to half. The service must start, every
   history must be whole turns of the planned conversation, and every context must continue as the twin from what
   survived. Turns whose commits lived only in the cut frames are counted apart: a WAL database loses exactly those,
   by construction.
4. **Full disk** (ENOSPC): the data directory on a small tmpfs the campaign mounts, filled to the last byte. Every
   call must answer, either a reply or 507 `storage_error` (never 500 or a crash), reads must work, and once space is
   freed calls must succeed again with no acknowledged turn lost.
5. **Read-only data directory**: the same mount remounted read-only (with the service stopped: Linux refuses it
   while files are open for writing) and the service started on it: it must refuse to start with a message that
   names the directory and the cause; remounted read-write, it starts with every turn there.
Phases 4 and 5 need mount rights (root); without them they are reported as skipped, with the reason. Ignores
faults of the model file and of the kernel cache (outside the data directory).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from llmaas.check.harness import Progress, ServiceUnderTest
from llmaas.check.history import check_history
from llmaas.client import ServiceError
from llmaas.storage.chunk_log import SEGMENT_SUFFIX

APP = "disk"
CONTEXTS = 3
TURNS = 4
MAX_TOKENS = 8
MAX_CONTEXT_TOKENS = 384
BASE = ["--threads", "1", "--max-context-tokens", str(MAX_CONTEXT_TOKENS), "--kv-budget-mb", "10"]
EXACT = [*BASE, "--kv-policy", "llms-lossless"]  # 8.4 MiB per 384-token FP16 context: 10 MiB holds about one
NO_PROFILE = [*BASE, "--kv-policy", "vllm-s"]  # exact too, and nothing written at start (fits a tiny mount)
FAULT_RATE = 0.3
MOUNT_BYTES = 48 * 2**20
TOPICS = ["kettle", "glacier", "violin", "orchard", "lantern", "compass", "harbor", "meteor"]


@dataclass
class Conversation:
    prompts: list[str]
    ctx: str = ""
    twin_ctx: str = ""
    twin_replies: list[str] = field(default_factory=list)
    acked: int = 0


@dataclass
class Tally:
    faults: int = 0
    calls: int = 0
    lost_turns: int = 0
    silent_corruptions: int = 0
    caller_errors: int = 0  # answers other than a reply or a clear storage error: 500s, crashes, dropped connections
    storage_errors: int = 0  # clear 507s while the disk refused writes (expected there)
    wal_lost_turns: int = 0
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.notes) < 50:
            self.notes.append(text)


class DiskCampaign:
    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.twin = ServiceUnderTest(EXACT, [APP], prefix="llmaas-disk-twin-")
        self.tally = Tally()
        self.phases: dict[str, dict] = {}

    def run(self) -> dict:
        progress = Progress("disk", 4)
        self.twin.start()
        try:
            for k, (name, phase) in enumerate((("write_errors", self._write_errors),
                                               ("corrupt_files", self._corrupt_files),
                                               ("truncated_wal", self._truncated_wal),
                                               ("full_disk_and_read_only", self._full_and_read_only))):
                before = (self.tally.faults, self.tally.silent_corruptions, self.tally.caller_errors)
                self.phases[name] = phase() or {}
                with self.twin.client(APP) as c:  # the twin's app holds the default 8 contexts: start each phase empty
                    for ctx in c.list():
                        c.delete(ctx["id"])
                self.phases[name].update(faults=self.tally.faults - before[0],
                                         silent_corruptions=self.tally.silent_corruptions - before[1],
                                         caller_errors=self.tally.caller_errors - before[2])
                progress.step(k + 1, f"faults {self.tally.faults}, silent corruptions {self.tally.silent_corruptions}")
        finally:
            self.twin.close()
        t = self.tally
        return {"faults": t.faults, "calls": t.calls, "lost_turns": t.lost_turns,
                "silent_corruptions": t.silent_corruptions, "caller_errors": t.caller_errors,
                "storage_errors": t.storage_errors, "wal_lost_turns": t.wal_lost_turns, "phases": self.phases,
                "notes": t.notes}

    # -- conversations -----------------------------------------------------------------------------------------

    def _open(self, sut: ServiceUnderTest) -> list[Conversation]:
        convs = []
        for _ in range(CONTEXTS):
            topics = [self.rng.choice(TOPICS) for _ in range(3 * TURNS)]
            conv = Conversation([f"Turn {i}: one fact about a {t}." for i, t in enumerate(topics)])
            with sut.client(APP) as c:
                conv.ctx = c.new_context("You answer in one short sentence.")
            with self.twin.client(APP) as c:
                conv.twin_ctx = c.new_context("You answer in one short sentence.")
            convs.append(conv)
        return convs

    def _twin_reply(self, conv: Conversation, turn: int) -> str:
        with self.twin.client(APP) as c:
            while len(conv.twin_replies) <= turn:
                conv.twin_replies.append(c.call(conv.twin_ctx, conv.prompts[len(conv.twin_replies)],
                                                max_tokens=MAX_TOKENS, temperature=0).reply)
        return conv.twin_replies[turn]

    def _start_and_play(self, sut: ServiceUnderTest, what: str) -> list[Conversation]:
        """Start the service, open the conversations and play TURNS turns of each, interleaved (every call evicts)."""
        sut.start()
        convs = self._open(sut)
        for _ in range(TURNS):
            for i, conv in enumerate(convs):
                self._turn(sut, conv, f"{what}, context {i}")
        return convs

    def _turn(self, sut: ServiceUnderTest, conv: Conversation, what: str, storage_ok: bool = False) -> bool:
        """One call of the conversation's next turn; True if it was acknowledged. A 507 is expected only where the
        disk refuses writes (storage_ok); any other failure is a caller error."""
        self.tally.calls += 1
        try:
            with sut.client(APP, timeout_s=120) as c:
                reply = c.call(conv.ctx, conv.prompts[conv.acked], max_tokens=MAX_TOKENS, temperature=0)
        except ServiceError as exc:
            if storage_ok and exc.status == 507 and "data directory" in str(exc):
                self.tally.storage_errors += 1
            else:
                self.tally.caller_errors += 1
                self.tally.note(f"{what}: {exc}")
            return False
        if reply.reply != self._twin_reply(conv, conv.acked):
            self.tally.silent_corruptions += 1
            self.tally.note(f"{what}: turn {conv.acked} {reply.reply!r} != twin {conv.twin_replies[conv.acked]!r}")
        conv.acked += 1
        return True

    def _verify(self, sut: ServiceUnderTest, convs: list[Conversation], what: str, wal_cut: bool = False) -> None:
        """After a restart: whole turns of the plan, nothing acknowledged missing (unless the WAL was cut), equal
        to the twin's, and every context continues as the twin does."""
        for conv in convs:
            with sut.client(APP) as c:
                got = c.get(conv.ctx)
            self._twin_reply(conv, max(len(got["messages"]) // 2 - 1, 0))
            verdict = check_history(got["messages"], got["num_calls"], conv.prompts, conv.twin_replies, conv.acked,
                                    in_flight=False)
            if verdict.half_saved or verdict.phantom or verdict.first_mismatch is not None:
                self.tally.silent_corruptions += 1
                self.tally.note(f"{what}: {conv.ctx} history {verdict}")
            if wal_cut:
                self.tally.wal_lost_turns += verdict.lost_turns
            else:
                self.tally.lost_turns += verdict.lost_turns
            conv.acked = verdict.stored_turns
            self._turn(sut, conv, f"{what} after restart")

    # -- the phases --------------------------------------------------------------------------------------------

    def _write_errors(self) -> dict:
        sut = ServiceUnderTest([*EXACT, "--inject-disk-faults", str(FAULT_RATE)], [APP], prefix="llmaas-disk-")
        try:
            convs = self._start_and_play(sut, "write errors")
            engine = sut.engine_stats()
            self.tally.faults += engine["kv_injected_disk_faults"]
            sut.stop()
            sut.start()
            self._verify(sut, convs, "write errors")
            return {"injected": engine["kv_injected_disk_faults"], "failed_writes": engine["kv_write_failures"]}
        finally:
            sut.close()

    def _corrupt_files(self) -> dict:
        sut = ServiceUnderTest(EXACT, [APP], prefix="llmaas-disk-")
        try:
            convs = self._start_and_play(sut, "corrupt files")
            sut.stop()  # a clean stop: every queued write-back is on disk
            segments = sorted(sut.home.kv_dir.rglob(f"*{SEGMENT_SUFFIX}"), key=lambda p: p.stat().st_size)
            for path in segments:
                with open(path, "r+b") as f:
                    f.seek(path.stat().st_size // 2)
                    byte = f.read(1)
                    f.seek(-1, os.SEEK_CUR)
                    f.write(bytes([byte[0] ^ 0x5A]))
            if segments:
                os.truncate(segments[-1], segments[-1].stat().st_size // 2)
            self.tally.faults += len(segments) + bool(segments)
            sut.start()
            self._verify(sut, convs, "corrupt files")
            return {"flipped_files": len(segments), "truncated_files": int(bool(segments)),
                    "corrupt_chunks_detected": sut.engine_stats()["kv_corrupt_chunks"]}
        finally:
            sut.close()

    def _truncated_wal(self) -> dict:
        sut = ServiceUnderTest(EXACT, [APP], prefix="llmaas-disk-")
        try:
            convs = self._start_and_play(sut, "truncated WAL")
            sut.kill9()
            wal = sut.home.catalog.with_name(sut.home.catalog.name + "-wal")
            size = wal.stat().st_size if wal.exists() else 0
            if size:
                os.truncate(wal, size // 2)
                self.tally.faults += 1
            sut.start()
            before = self.tally.wal_lost_turns
            self._verify(sut, convs, "truncated WAL", wal_cut=True)
            return {"wal_bytes": size, "cut_to": size // 2, "turns_lost_with_the_cut_frames":
                    self.tally.wal_lost_turns - before}
        finally:
            sut.close()

    def _full_and_read_only(self) -> dict:
        mount = Path(tempfile.mkdtemp(prefix="llmaas-disk-mount-"))
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={MOUNT_BYTES}", "tmpfs", str(mount)],
                              capture_output=True, text=True)
        if made.returncode != 0:
            mount.rmdir()
            reason = (made.stderr or made.stdout).strip() or f"mount exited {made.returncode}"
            return {"skipped": f"cannot mount a tmpfs here ({reason}); run as root to include it"}
        sut = ServiceUnderTest(NO_PROFILE, [APP], root=mount / "home")
        try:
            sut.start()
            convs = self._open(sut)
            for conv in convs:
                self._turn(sut, conv, "full disk, before")
            filler = mount / "filler"
            _fill(filler)
            self.tally.faults += 1
            refused = self._refusing_phase(sut, convs, "full disk")
            filler.unlink()
            for conv in convs:
                self._turn(sut, conv, "full disk, after freeing space")
            # Read-only: Linux refuses to remount a filesystem read-only while a process holds files on it open
            # for writing (the running service does), so the service is stopped, the mount made read-only, and
            # the service started on it: it must refuse with a message naming the directory and the cause.
            sut.stop()
            remount = subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True, text=True)
            if remount.returncode:
                read_only: dict = {"skipped": remount.stderr.strip()}
            else:
                self.tally.faults += 1
                started = subprocess.run([sys.executable, "-m", "llmaas", "serve", "--home", str(sut.home.root),
                                          "--quiet", *NO_PROFILE], capture_output=True, text=True, timeout=120)
                clear = started.returncode != 0 and "does not take writes" in started.stderr
                if not clear:
                    self.tally.caller_errors += 1
                    self.tally.note(f"read-only: serve exited {started.returncode}: {started.stderr[-300:]}")
                read_only = {"refused_to_start": started.returncode != 0, "message": started.stderr.strip()[-300:]}
                subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
            sut.start()
            self._verify(sut, convs, "full disk and read-only")
            return {"mount_bytes": MOUNT_BYTES, "full_disk_refused_calls": refused, "read_only": read_only}
        finally:
            sut.stop()
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)
            shutil.rmtree(mount, ignore_errors=True)

    def _refusing_phase(self, sut: ServiceUnderTest, convs: list[Conversation], what: str) -> int:
        """Calls and reads while the disk refuses writes: each call a reply or a clear 507, every read answered."""
        refused = 0
        for _ in range(2):
            for conv in convs:
                refused += not self._turn(sut, conv, what, storage_ok=True)
                try:
                    with sut.client(APP) as c:
                        c.get(conv.ctx)
                        c.list()
                except ServiceError as exc:
                    self.tally.caller_errors += 1
                    self.tally.note(f"{what}: a read failed: {exc}")
        if not sut.is_alive():
            self.tally.caller_errors += 1
            self.tally.note(f"{what}: the service died")
            sut.start()
        return refused


def _fill(path: Path) -> None:
    """Write zeros until the filesystem has no byte left (ENOSPC), in ever smaller writes at the end."""
    block = bytes(1 << 20)
    size = len(block)
    with open(path, "wb", buffering=0) as f:
        while size:
            try:
                f.write(block[:size])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                size //= 2
