"""Where chunk bytes go in a segment, and which byte ranges a read of some chunks' layers needs.

Owns the arithmetic of the two layouts. A *group* (several chunks written together) is every chunk's header, then
layer 0's section of every chunk, then layer 1's, ...: one layer of the group is one contiguous range, so the
restore pipeline's per-layer reads are one request per layer, and the whole group is one range too. A *lone
record* is a header followed by its sections. Either way chunk layer l lies at sections_offset + l * layer_stride.
Reads: chunks adjacent within a group's layer blocks form a run, read as one range per layer (or one range in all
when the run fills the blocks). Ignores IO and verification (chunk_log.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llmaas.storage.chunk_index import ChunkLocation
from llmaas.storage.segment_io import Span, Want


@dataclass(frozen=True)
class Placement:
    """One chunk's bytes, relative to the start of the write (group) that holds it."""

    header_at: int
    header_bytes: int
    sections_at: int  # layer 0's section
    layer_stride: int


@dataclass(frozen=True)
class GroupLayout:
    placements: list[Placement]
    total_bytes: int
    data_at: int  # where the layer blocks start (grouped layout)
    block_bytes: int  # bytes of one layer of every chunk (grouped layout)
    is_grouped: bool


def layout_write(header_sizes: list[int], section_sizes: list[int], n_layers: int, grouped: bool) -> GroupLayout:
    """Placements of chunks written together: grouped (layer-major across chunks) or as lone records in a row."""
    if grouped and len(header_sizes) > 1:
        data_at, block = sum(header_sizes), sum(section_sizes)
        placements, header_at, within = [], 0, 0
        for h, s in zip(header_sizes, section_sizes, strict=True):
            placements.append(Placement(header_at, h, data_at + within, block))
            header_at += h
            within += s
        return GroupLayout(placements, data_at + n_layers * block, data_at, block, True)
    placements, at = [], 0
    for h, s in zip(header_sizes, section_sizes, strict=True):
        placements.append(Placement(at, h, at + h, s))
        at += h + n_layers * s
    return GroupLayout(placements, at, 0, 0, False)


@dataclass
class Run:
    """Chunks adjacent within one group's layer blocks: layer l of the run is [start + l * stride, + length)."""

    segment: str
    start: int  # file offset of the run's layer-0 bytes
    length: int  # bytes of the run in one layer
    stride: int
    members: list[tuple[int, int, int]] = field(default_factory=list)  # (chunk position, offset in run, section bytes)
    wants: list[Want] = field(default_factory=list)  # one for all layers (when length == stride), else one per layer
    # Dense reads of several layers of several chunks (or into caller buffers) scatter: each chunk's sections land
    # contiguous in gathered[offset in run] (a caller's buffer, or a slice of one array for the run), put there by
    # the read itself, not by a copy.
    gathered: dict[int, np.ndarray] | None = None
    in_place: set[int] = field(default_factory=set)  # chunk positions whose own buffer (`into`) is gathered into

    @property
    def is_dense(self) -> bool:
        return self.length == self.stride

    def extents(self, num_layers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(file offsets, iovecs, tags) of every section this scattering run reads, in file order (Span.extent_at,
        extent_iov, extent_tag). A section that lands in its chunk's own buffer (in_place) is tagged
        position * num_layers + layer (layers counted from the read's first), so whoever reads it can verify it
        there; the others -1. Built as arrays: a 2,048-token context is ~3,800 sections."""
        assert self.gathered is not None
        rels = sorted({(rel, s) for _, rel, s in self.members})
        owner = {rel: i for i, rel, _ in self.members if i in self.in_place}
        rel = np.array([r for r, _ in rels], dtype=np.int64)
        size = np.array([s for _, s in rels], dtype=np.int64)
        address = np.array([self.gathered[r].ctypes.data for r, _ in rels], dtype=np.int64)
        position = np.array([owner.get(r, -1) for r, _ in rels], dtype=np.int64)
        layer = np.arange(num_layers, dtype=np.int64)[:, None]
        at = (self.wants[0].offset + layer * self.stride + rel).reshape(-1)
        iov = np.empty((at.size, 2), dtype=np.uint64)
        iov[:, 0] = (address + layer * size).reshape(-1)
        iov[:, 1] = np.broadcast_to(size, (num_layers, size.size)).reshape(-1)
        tag = np.where(position >= 0, position * num_layers + layer, -1).reshape(-1)
        return at, iov, tag


@dataclass
class ReadPlan:
    first_layer: int
    num_layers: int
    wants: list[Want]
    headers: dict[int, Want]  # chunk position in the request -> its header's range (absent when cached)
    runs: list[Run]


def plan_read(locs: list[ChunkLocation], first_layer: int, num_layers: int, cached: list[bool],
              into: list[np.ndarray] | None = None) -> ReadPlan:
    """`cached[i]`: chunk i's verified header is already known (its bytes need not be read). `into[i]`: where chunk
    i's sections should land (uint8, num_layers * section bytes); dense runs read straight into it."""
    headers = {i: Want(loc.segment, loc.offset, loc.header_bytes, ("header", i))
               for i, loc in enumerate(locs) if not cached[i]}
    order = sorted(range(len(locs)), key=lambda i: (locs[i].segment, locs[i].layer_stride, locs[i].sections_offset))
    runs: list[Run] = []
    for i in order:
        loc = locs[i]
        run = runs[-1] if runs else None
        if run is not None and run.segment == loc.segment and run.stride == loc.layer_stride \
                and run.start <= loc.sections_offset < run.start + run.length:
            run.members.append((i, loc.sections_offset - run.start, loc.section_bytes))  # asked for twice
            continue
        if run is None or run.segment != loc.segment or run.stride != loc.layer_stride \
                or loc.sections_offset != run.start + run.length:
            run = Run(loc.segment, loc.sections_offset, 0, loc.layer_stride)
            runs.append(run)
        run.members.append((i, run.length, loc.section_bytes))
        run.length += loc.section_bytes
    wants = list(headers.values())
    for r, run in enumerate(runs):
        base = run.start + first_layer * run.stride
        if run.is_dense:
            run.wants = [Want(run.segment, base, num_layers * run.stride, ("run", r, 0))]
            if into is not None:
                run.gathered = {}
                for i, rel, _ in run.members:  # a chunk asked for twice lands in its first buffer (copied later)
                    if rel not in run.gathered:
                        run.gathered[rel] = into[i]
                        run.in_place.add(i)
            elif num_layers > 1 and len({rel for _, rel, _ in run.members}) > 1:
                rels = sorted({(rel, s) for _, rel, s in run.members})
                ends = np.cumsum([num_layers * s for _, s in rels])
                array = np.empty(int(ends[-1]), dtype=np.uint8)
                run.gathered = {rel: array[end - num_layers * s:end] for (rel, s), end in zip(rels, ends, strict=True)}
        else:
            run.wants = [Want(run.segment, base + j * run.stride, run.length, ("run", r, j)) for j in range(num_layers)]
        wants += run.wants
    return ReadPlan(first_layer, num_layers, wants, headers, runs)


def cut_run(run: Run, first: int, end: int, span_of: dict[object, Span]) -> list[tuple[int, np.ndarray | str]]:
    """Each member chunk's sections of the planned layers [first, end) (0 = the plan's first layer), contiguous
    (views into the read's buffers), or 'io_error' / 'truncated' when its bytes are not all there. numpy, not
    torch: this runs per chunk per read on the restore path, where torch's small-op overheads (and, measured, its
    strided uint8 copy on 2 busy cores) show."""
    n = end - first
    out: list[tuple[int, np.ndarray | str]] = []
    if run.is_dense:
        want = run.wants[0]
        span = span_of[want.tag]
        if span.error is not None:
            return [(i, "io_error") for i, _, _ in run.members]
        data, base, valid = span.array, want.offset - span.offset + first * run.stride, span.valid_bytes
        assert data is not None  # every span of a segment that exists got its buffer (_Reading.submit)
        for i, rel, s in run.members:
            at = base + rel
            if at + (n - 1) * run.stride + s > valid:
                out.append((i, "truncated"))
            elif run.gathered is not None:
                out.append((i, run.gathered[rel][first * s:end * s]))
            elif n == 1 or run.stride == s:
                out.append((i, data[at:at + n * s]))
            else:  # not reached with plan_read's plans (a lone chunk's run has stride == s); kept for completeness
                strided = np.lib.stride_tricks.as_strided(data[at:], (n, s), (run.stride, 1), writeable=False)
                out.append((i, np.ascontiguousarray(strided).reshape(-1)))
        return out
    wants = run.wants[first:end]
    spans = [span_of[w.tag] for w in wants]
    firsts = [w.offset - sp.offset for w, sp in zip(wants, spans, strict=True)]
    if any(sp.error is not None for sp in spans):
        return [(i, "io_error") for i, _, _ in run.members]
    arrays = [sp.array for sp in spans if sp.array is not None]
    assert len(arrays) == len(spans)  # every span of a segment that exists got its buffer (_Reading.submit)
    for i, rel, s in run.members:
        if any(f + rel + s > sp.valid_bytes for f, sp in zip(firsts, spans, strict=True)):
            out.append((i, "truncated"))
        elif n == 1:
            out.append((i, arrays[0][firsts[0] + rel:firsts[0] + rel + s]))
        else:
            parts = [a[f + rel:f + rel + s] for f, a in zip(firsts, arrays, strict=True)]
            out.append((i, np.concatenate(parts)))
    return out


def needed_ends(plan: ReadPlan, runs: list[Run], end: int) -> dict[str, int]:
    """Per segment, the file offset below which every byte that layers [0, end) of `runs` (and every header of the
    plan) need lies: a streaming read may hand those layers over once the requests before it are in."""
    ends: dict[str, int] = {}
    for w in plan.headers.values():
        ends[w.segment] = max(ends.get(w.segment, 0), w.offset + w.length)
    for run in runs:
        if run.is_dense:
            at = run.wants[0].offset + (end - 1) * run.stride + run.length
        else:
            at = run.wants[end - 1].offset + run.length
        ends[run.segment] = max(ends.get(run.segment, 0), at)
    return ends
