"""A language-modelling task whose per-token difficulty is known by construction (examples/difficulty_benchmark.py).

A sequence is quadruples [a, b, table[a, b], SEP] back to back: a and b are drawn uniformly from N values each,
`table` is a fixed random map of the N x N pairs into V values, SEP is one token. What a causal LM predicts at
each position of a quadruple (the token after it) is of one of three kinds:

    position holds   predicts        class          best possible NLL
    a                b               irreducible    log N (uniform noise: no compute helps)
    b                table[a, b]     hard           0 (a lookup over N^2 pairs: learnable, needs capacity)
    table[a, b]      SEP             easy           0 (deterministic, trivial)
    SEP              the next a      irreducible    log N

N (the table size) is the difficulty knob of the hard class. The class of a position is its index mod 4, so any
batch of whole sequences (length a multiple of 4) gives it from the flat token index as well.

Vocabulary: a tokens 0..N-1, b tokens N..2N-1, table values 2N..2N+V-1, SEP 2N+V.
"""

from dataclasses import dataclass

import torch

# Position (index mod 4) -> class of the token predicted there.
POSITION_CLASSES = ("irreducible", "hard", "easy", "irreducible")
CLASSES = ("easy", "hard", "irreducible")
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}


@dataclass(frozen=True)
class LookupTask:
    """The task for table size `keys` (N) with `values` (V) table values; `table_seed` fixes the table (the same
    for every training seed: seeds vary the model's initialisation and the data order, not the task)."""

    keys: int = 64
    values: int = 32
    seq_len: int = 48
    table_seed: int = 0

    def __post_init__(self):
        if self.seq_len % 4:
            raise ValueError(f"seq_len must be a multiple of 4 (whole quadruples), got {self.seq_len}")

    @property
    def vocab_size(self) -> int:
        return 2 * self.keys + self.values + 1

    @property
    def sep(self) -> int:
        return 2 * self.keys + self.values

    @property
    def table(self) -> torch.Tensor:
        """(N, N) long: the table value index (0..V-1) of each pair, fixed by `table_seed`."""
        generator = torch.Generator().manual_seed(self.table_seed)
        return torch.randint(self.values, (self.keys, self.keys), generator=generator)

    def sample(self, batch_size: int, generator: torch.Generator, table: torch.Tensor | None = None) -> torch.Tensor:
        """(batch_size, seq_len) token ids of fresh random sequences drawn with `generator`."""
        table = self.table if table is None else table
        quads = self.seq_len // 4
        a = torch.randint(self.keys, (batch_size, quads), generator=generator)
        b = torch.randint(self.keys, (batch_size, quads), generator=generator)
        value = table[a, b]
        sep = torch.full_like(a, self.sep)
        return torch.stack([a, b + self.keys, value + 2 * self.keys, sep], dim=-1).reshape(batch_size, -1)

    def best_nll(self) -> dict[str, float]:
        """The lowest NLL per class any model can reach (nats)."""
        return {"easy": 0.0, "hard": 0.0, "irreducible": float(torch.tensor(float(self.keys)).log())}


def position_classes(seq_len: int) -> torch.Tensor:
    """(seq_len,) long: the class (index into `CLASSES`) of the token predicted at each position."""
    return torch.tensor([CLASS_INDEX[POSITION_CLASSES[i % 4]] for i in range(seq_len)])


def token_classes(num_tokens: int, device=None) -> torch.Tensor:
    """(T,) long: the class of each of the T = B * L flat tokens of a batch of whole sequences (L a multiple of 4,
    so the flat index mod 4 is the position mod 4)."""
    table = torch.tensor([CLASS_INDEX[c] for c in POSITION_CLASSES], device=device)
    return table[torch.arange(num_tokens, device=device) % 4]
