"""Executing a plan: safetensors shards written tensor by tensor, into a staging folder that replaces the
output folder only once everything is written.

Shapes and dtypes are known from the plan, so each shard's header is written first and every tensor is
made, written and dropped in turn: memory stays near one output tensor plus the inputs it is made from.
Also what every conversion leaves beside the weights to say how it was made: its command and model card.
"""

import contextlib
import json
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..modeling.model_card import render_model_card
from .checkpoint import DTYPE_NAMES, CheckpointReader, ConversionError
from .plan import PlannedTensor

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def parse_size(size: str | int) -> int:
    """ "2GB", "500MB", "64KiB" or a number of bytes -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ConversionError(f"max shard size {size!r}: expected a number of bytes or e.g. '2GB', '500MB'.")
    return int(float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").upper()])


def shard_plan(plan: list[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """Consecutive groups of at most `max_shard_size` bytes (a larger tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for p in plan:
        if current and size + p.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(p)
        size += p.nbytes
    if current:
        shards.append(current)
    return shards


def _header(shard: list[PlannedTensor]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for p in shard:
        header[p.name] = {
            "dtype": DTYPE_NAMES[p.dtype],
            "shape": list(p.shape),
            "data_offsets": [offset, offset + p.nbytes],
        }
        offset += p.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    return len(encoded).to_bytes(8, "little") + encoded


def _make(p: PlannedTensor, reader: CheckpointReader | None) -> torch.Tensor:
    cache: dict[str, torch.Tensor] = {}
    inputs = []
    for source in p.sources:
        if source not in cache:
            cache[source] = reader.get(source)
        inputs.append(cache[source])
    tensor = p.make(inputs).to(p.dtype).contiguous()
    if tuple(tensor.shape) != tuple(p.shape):
        raise ConversionError(f"shape mismatch for {p.name}: made {tuple(tensor.shape)}, planned {tuple(p.shape)}.")
    return tensor


def write_plan(
    plan: list[PlannedTensor], reader: CheckpointReader | None, folder: Path, max_shard_size: int | str = "2GB"
) -> list[str]:
    """Write the planned tensors as safetensors shards in `folder` (one `model.safetensors` when they fit in
    one shard, else `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`). Returns the files."""
    shards = shard_plan(plan, parse_size(max_shard_size))
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map = {}
    for file_name, shard in zip(names, shards, strict=True):
        with open(folder / file_name, "wb") as f:
            f.write(_header(shard))
            for p in tqdm(shard, desc=f"Writing {file_name}", unit="tensor", leave=False):
                tensor = _make(p, reader)
                f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
                weight_map[p.name] = file_name
                del tensor
        if reader is not None:
            reader.close()
    if len(shards) > 1:
        total = sum(p.nbytes for p in plan)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        names.append(INDEX_FILE)
    return names


def check_output_folder(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing `out` unless `overwrite`; returns it as a Path."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists; pass --overwrite (overwrite=True) to replace it.")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out} exists and is not a folder; refusing to replace it.")
    return out


@contextlib.contextmanager
def staged_output(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside `out` to write into; on success it replaces `out` (the old `out` is removed
    only after the new one is in place), on any error it is removed and `out` is left untouched."""
    out = check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            try:
                os.replace(staging, out)
            except BaseException:
                os.replace(old / out.name, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def command_line(*args) -> str:
    """`hf-dare ARGS`, shell-quoted: the command a conversion records in `config.training_stages`."""
    return "hf-dare " + " ".join(shlex.quote(str(a)) for a in args)


def write_model_card(folder: Path, config, made_from: str, how: str, notes: Sequence[str] = ()) -> None:
    """`folder/README.md`: the model card of the converted `config` (an MoE config or a dense `LlavaConfig`),
    whose `training_stages` already hold the conversion's command."""
    card = render_model_card(config, made_from=made_from, how=how, notes=notes)
    (folder / "README.md").write_text(card, encoding="utf-8")
