"""Reading checkpoints: where a source lives, which tensors it holds, and one tensor at a time on demand.

`CheckpointReader` only reads safetensors headers up front; a tensor's data is read when a conversion asks
for it, and only one file is open at a time, so memory stays near one input tensor.
"""

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from hf_dare.errors import InputError


class ConversionError(InputError):
    """A checkpoint cannot be converted: unsupported architecture, missing tensor, shape mismatch, unsafe
    weights format or an output folder that is in the way. The message names the culprit."""


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

# Files copied from a source beside the converted weights (tokenizer, processor, chat template, generation).
SIDE_FILE_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "*.model",
    "chat_template.*",
    "processor_config.json",
    "preprocessor_config.json",
    "generation_config.json",
)


def resolve_source(src: str | Path) -> Path:
    """A local folder as is; anything else is taken as a Hub repo id and downloaded (config, weights, tokenizer)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(src).startswith((".", "/", "~")) or str(src).count("/") > 1:
        raise ConversionError(f"{src}: not a checkpoint folder (no such directory).")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(src)))


def read_config_dict(folder: Path) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{folder}: no config.json, not a transformers checkpoint.")
    return json.loads(config_file.read_text())


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The weight files of a checkpoint folder, in index order. Pickle (`.bin`) weights are refused unless
    `allow_pickle`, since unpickling can run code."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            files = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
            paths = [folder / name for name in files]
            break
    else:
        paths = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not paths:
        raise ConversionError(f"{folder}: no weights found (expected *.safetensors, or *.bin with --allow-pickle).")
    if any(p.suffix == ".bin" for p in paths) and not allow_pickle:
        raise ConversionError(
            f"{folder}: weights are pickle (.bin) files, which can run code when loaded; refusing them. "
            "Pass --allow-pickle (allow_pickle=True) to load them with torch.load(weights_only=True)."
        )
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ConversionError(f"{folder}: weight files listed in the index are missing: {missing}.")
    return paths


class CheckpointReader:
    """The tensors of a checkpoint folder under (optionally renamed) names, read lazily.

    `rename(key) -> name | None` maps stored keys to the names a conversion uses (None drops a key). Shapes
    and dtypes come from the file headers; `get(name)` reads one tensor, keeping one file open at a time.
    """

    def __init__(self, folder: str | Path, allow_pickle: bool = False, rename: Callable[[str], str | None] = None):
        self.folder = Path(folder)
        self.files = weight_files(self.folder, allow_pickle)
        self._entries: dict[str, tuple[int, str]] = {}  # name -> (file index, stored key)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._open_index: int | None = None
        self._open_file = None
        self._orders: dict[str, int] = {}
        for file_idx, path in enumerate(self.files):
            for key, shape, dtype in self._scan(path):
                name = rename(key) if rename else key
                if name is None:
                    continue
                if name in self._entries:
                    raise ConversionError(f"{self.folder}: two stored tensors map to {name!r}.")
                self._entries[name] = (file_idx, key)
                self._shapes[name] = shape
                self._dtypes[name] = dtype

    @staticmethod
    def _scan(path: Path):
        if path.suffix == ".bin":
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for key, tensor in state.items():
                yield key, tuple(tensor.shape), tensor.dtype
            return
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor_slice = f.get_slice(key)
                yield key, tuple(tensor_slice.get_shape()), SAFETENSORS_DTYPES[tensor_slice.get_dtype()]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def num_elements(self) -> int:
        """The number of values in every tensor read (the model's size)."""
        return sum(math.prod(shape) for shape in self._shapes.values())

    def position(self, name: str) -> tuple[int, int]:
        """Where `name` is stored (file index, order in the listing): conversions read in this order."""
        if len(self._orders) != len(self._entries):
            self._orders = {n: i for i, n in enumerate(self._entries)}
        return self._entries[name][0], self._orders[name]

    def get(self, name: str) -> torch.Tensor:
        file_idx, key = self._entries[name]
        if self._open_index != file_idx:
            self.close()
            path = self.files[file_idx]
            if path.suffix == ".bin":
                self._open_file = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            else:
                self._open_file = safe_open(path, framework="pt")
            self._open_index = file_idx
        if isinstance(self._open_file, dict):
            return self._open_file[key].clone()
        return self._open_file.get_tensor(key)

    def close(self) -> None:
        """Drop the open file (and its memory map)."""
        self._open_file, self._open_index = None, None


def rename_by_rules(rules: list[tuple[str, str]]) -> Callable[[str], str | None]:
    """A `rename` for `CheckpointReader` from (regex, replacement) rules applied in order; a replacement of
    None drops the key."""
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]

    def rename(key: str) -> str | None:
        for pattern, replacement in compiled:
            if pattern.search(key):
                if replacement is None:
                    return None
                key = pattern.sub(replacement, key)
        return key

    return rename


def copy_side_files(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy tokenizer / processor / chat template / generation files from `src` to `dst`; returns their names."""
    copied = []
    for pattern in SIDE_FILE_PATTERNS:
        for path in sorted(src.glob(pattern)):
            if path.is_file() and path.name not in copied and path.name not in skip:
                shutil.copy2(path, dst / path.name)
                copied.append(path.name)
    return copied
