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

import torch

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
    wants: list[Want] = field(default_factory=list)  # one for all layers (when length == stride), else one per layer

    @property
    def is_dense(self) -> bool:
        return self.length == self.stride


@dataclass
class ReadPlan:
    first_layer: int
    num_layers: int
    wants: list[Want]
    headers: dict[int, Want]  # chunk position in the request -> its header's range (absent when cached)
    placement: list[tuple[Run, int]]  # per chunk: its run and its offset within the run's per-layer bytes


def plan_read(locs: list[ChunkLocation], first_layer: int, num_layers: int, cached: list[bool]) -> ReadPlan:
    """`cached[i]`: chunk i's verified header is already known (its bytes need not be read)."""
    headers = {i: Want(loc.segment, loc.offset, loc.header_bytes, ("header", i))
               for i, loc in enumerate(locs) if not cached[i]}
    order = sorted(range(len(locs)), key=lambda i: (locs[i].segment, locs[i].layer_stride, locs[i].sections_offset))
    runs: list[Run] = []
    placement: list[tuple[Run, int] | None] = [None] * len(locs)
    for i in order:
        loc = locs[i]
        run = runs[-1] if runs else None
        if run is None or run.segment != loc.segment or run.stride != loc.layer_stride \
                or loc.sections_offset != run.start + run.length:
            if run is not None and run.start <= loc.sections_offset < run.start + run.length:
                placement[i] = (run, loc.sections_offset - run.start)  # the same chunk asked for twice
                continue
            run = Run(loc.segment, loc.sections_offset, 0, loc.layer_stride)
            runs.append(run)
        placement[i] = (run, run.length)
        run.length += loc.section_bytes
    wants = list(headers.values())
    for r, run in enumerate(runs):
        base = run.start + first_layer * run.stride
        if run.is_dense:
            run.wants = [Want(run.segment, base, num_layers * run.stride, ("run", r, 0))]
        else:
            run.wants = [Want(run.segment, base + j * run.stride, run.length, ("run", r, j)) for j in range(num_layers)]
        wants += run.wants
    return ReadPlan(first_layer, num_layers, wants, headers, placement)  # type: ignore[arg-type]


def cut_sections(plan: ReadPlan, i: int, loc: ChunkLocation, span_of: dict[object, Span]) -> torch.Tensor | str:
    """Chunk i's sections of the planned layers, contiguous: a view when they are contiguous in the read buffer,
    else one strided copy. Returns 'io_error' or 'truncated' when the bytes are not all there."""
    run, rel = plan.placement[i]
    n, s = plan.num_layers, loc.section_bytes
    # (want, offset of this chunk's section within it) per layer
    pieces = [(run.wants[0], rel + j * run.stride) for j in range(n)] if run.is_dense else [(w, rel) for w in run.wants]
    spans = {id(span_of[w.tag]) for w, _ in pieces}
    for w, at in (pieces[0], pieces[-1]) if len(spans) == 1 else pieces:
        span = span_of[w.tag]
        if span.error is not None:
            return "io_error"
        if not span.covers(Want(w.segment, w.offset + at, s, None)):
            return "truncated"
    if len(spans) == 1:
        span = span_of[pieces[0][0].tag]
        start = pieces[0][0].offset - span.offset + pieces[0][1]
        assert span.buffer is not None
        if n == 1 or run.stride == s:
            return span.buffer[start:start + n * s]
        return span.buffer.as_strided((n, s), (run.stride, 1), span.buffer.storage_offset() + start).reshape(-1)
    return torch.cat([span_of[w.tag].view(Want(w.segment, w.offset + at, s, None)) for w, at in pieces])
