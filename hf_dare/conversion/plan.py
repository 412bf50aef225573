"""A conversion as a declarative plan: for every output tensor, its name, shape, dtype, the input tensors it
is made from and how (copy, stack into experts, split, fresh initialisation). Nothing is read while the plan
is built; `hf_dare.conversion.writer` executes it tensor by tensor.
"""

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .checkpoint import CheckpointReader, ConversionError


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: `make(inputs)` builds it from the tensors named in `sources` (in that order);
    `anchor` is an input tensor near which it is written (for fresh tensors, which have no sources)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    sources: tuple[str, ...]
    make: Callable[[list[torch.Tensor]], torch.Tensor]
    anchor: str | None = None

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


def copy_of(reader: CheckpointReader, source: str, name: str | None = None) -> PlannedTensor:
    """`name` (default: same as `source`) is the input tensor unchanged."""
    return PlannedTensor(name or source, reader.shape(source), reader.dtype(source), (source,), _first)


def _first(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def stacked_gate_up(reader: CheckpointReader, name: str, pairs: Sequence[tuple[str, str]]) -> PlannedTensor:
    """Experts' `gate_up_proj` (E, 2I, H): expert e is cat([gate_e, up_e]) of the FFN weights in `pairs[e]`."""
    gate, up = pairs[0]
    for g, u in pairs:
        if reader.shape(g) != reader.shape(gate) or reader.shape(u) != reader.shape(gate):
            raise ConversionError(
                f"shape mismatch: {g} {reader.shape(g)} / {u} {reader.shape(u)} differ from {gate} {reader.shape(gate)}; "
                "every expert's gate_proj and up_proj must have one shape (I, H)."
            )
    inter, hidden = reader.shape(gate)
    sources = tuple(n for pair in pairs for n in pair)

    def make(tensors: list[torch.Tensor]) -> torch.Tensor:
        out = torch.empty((len(pairs), 2 * inter, hidden), dtype=tensors[0].dtype)  # no per-expert temporaries
        for e in range(len(pairs)):
            out[e, :inter], out[e, inter:] = tensors[2 * e], tensors[2 * e + 1]
        return out

    return PlannedTensor(name, (len(pairs), 2 * inter, hidden), reader.dtype(gate), sources, make)


def stacked(reader: CheckpointReader, name: str, sources: Sequence[str]) -> PlannedTensor:
    """Experts' `down_proj` (E, H, I): expert e is the input tensor `sources[e]`."""
    first = sources[0]
    for source in sources:
        if reader.shape(source) != reader.shape(first):
            raise ConversionError(
                f"shape mismatch: {source} {reader.shape(source)} differs from {first} {reader.shape(first)}."
            )
    return PlannedTensor(
        name, (len(sources), *reader.shape(first)), reader.dtype(first), tuple(sources), torch.stack, anchor=first
    )


def with_redrawn_channels(
    planned: PlannedTensor, channels: Sequence[torch.Tensor], axis: int, parts: int, seed: int
) -> PlannedTensor:
    """Drop-Upcycling (Nakamura et al., ICLR 2025) on stacked experts `planned` (E, ...), each a copy of the dense
    FFN's matrix: in expert e, the intermediate channels `channels[e]` (along `axis` of the expert's matrix: rows of
    `gate_up_proj`, columns of `down_proj`) drawn anew from a normal with the mean and standard deviation of the
    dense matrix. `parts` matrices stacked along `axis` (gate and up: 2) each keep their own statistics, and each
    redraws the same channels. Seeded by `seed` and the expert: byte-identical on every run."""

    def make(tensors: list[torch.Tensor]) -> torch.Tensor:
        out = planned.make(tensors)
        size = out.shape[axis + 1] // parts
        for e, chosen in enumerate(channels):
            generator = torch.Generator().manual_seed(seeded(seed, f"{planned.name}.{e}"))
            for part in range(parts):
                dense = out[e].narrow(axis, part * size, size)  # a view of expert e's copy of the dense matrix
                mean, std = dense.float().mean().item(), dense.float().std().item()
                index = chosen + part * size
                shape = list(out[e].shape)
                shape[axis] = len(chosen)
                drawn = torch.empty(shape).normal_(mean, std, generator=generator).to(out.dtype)
                out[e].index_copy_(axis, index, drawn)
        return out

    return PlannedTensor(planned.name, planned.shape, planned.dtype, planned.sources, make, planned.anchor)


def rows_of(reader: CheckpointReader, source: str, name: str, start: int, stop: int) -> PlannedTensor:
    """Rows `start:stop` of the input tensor (e.g. q / k / v out of a fused qkv projection)."""
    shape = reader.shape(source)
    if stop > shape[0]:
        raise ConversionError(f"shape mismatch: {source} has {shape[0]} rows, {name} needs rows {start}:{stop}.")

    def make(tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0][start:stop].clone()

    return PlannedTensor(name, (stop - start, *shape[1:]), reader.dtype(source), (source,), make)


def padded_rows(reader: CheckpointReader, source: str, name: str, num_rows: int) -> PlannedTensor:
    """The input tensor grown to `num_rows` rows; new rows are the mean of the old ones (a new token's
    embedding / output row, e.g. `<image>` added to the vocabulary)."""
    shape = reader.shape(source)

    def make(tensors: list[torch.Tensor]) -> torch.Tensor:
        old = tensors[0]
        extra = old.float().mean(0, keepdim=True).expand(num_rows - old.shape[0], *old.shape[1:])
        return torch.cat([old, extra.to(old.dtype)])

    return PlannedTensor(name, (num_rows, *shape[1:]), reader.dtype(source), (source,), make)


def seeded(seed: int, name: str) -> int:
    """The seed of the random stream of the fresh tensor(s) `name`, from the conversion's `seed`."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def check_plan(
    plan: list[PlannedTensor],
    expected: dict[str, tuple[int, ...]],
    architecture: str,
    optional: Sequence[str] = (),
) -> None:
    """Every tensor the target model has is planned with its shape, and nothing else is: raises
    `ConversionError` naming the tensor otherwise. `optional` names may be absent (tied weights)."""
    planned = {p.name: p for p in plan}
    missing = [n for n in expected if n not in planned and n not in optional]
    if missing:
        raise ConversionError(f"missing tensor(s) for {architecture}: {', '.join(missing[:8])}")
    extra = [n for n in planned if n not in expected]
    if extra:
        raise ConversionError(f"{architecture} has no tensor(s) named {', '.join(extra[:8])}")
    for name, p in planned.items():
        if tuple(p.shape) != tuple(expected[name]):
            made_from = f" (made from {', '.join(dict.fromkeys(p.sources))})" if p.sources else ""
            raise ConversionError(
                f"shape mismatch for {name}{made_from}: got {tuple(p.shape)}, {architecture} expects "
                f"{tuple(expected[name])}."
            )


def in_reading_order(plan: list[PlannedTensor], reader: CheckpointReader) -> list[PlannedTensor]:
    """The plan sorted by where its inputs are stored, so the input files are read one after the other."""

    def key(p: PlannedTensor):
        anchor = p.anchor or (p.sources[0] if p.sources else None)
        return reader.position(anchor) if anchor in reader else (len(reader.files), 0)

    return sorted(plan, key=key)
