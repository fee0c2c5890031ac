"""Tokenise a split once, cache the token ids on disk, and collate dynamic-padded batches.

The cache key is the tokenizer's full serialisation, the max length, the pair encoding and the
raw bytes of the source file, so a changed file, vocabulary or length never reads a stale cache.
Each entry also stores the SHA-256 of its own tensors: a truncated or corrupt entry (one that does
not load, or loads with other bytes) is rebuilt, never used.
Token ids are stored flat (one int32 tensor plus offsets per text segment) to keep the cache small.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from peft_lightning.data.readers import Split
from peft_lightning.files import atomic_write

log = logging.getLogger(__name__)

CACHE_VERSION = "2"  # 2: entries carry a checksum of their tensors


@dataclass
class Segment:
    """Token ids of N texts stored flat: text i is `ids[offsets[i]:offsets[i + 1]]`."""

    ids: torch.Tensor  # (total_tokens,) int32
    offsets: torch.Tensor  # (N + 1,) int64
    token_types: torch.Tensor | None  # (total_tokens,) int8, cross-encoded pairs only

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])


@dataclass
class EncodedSplit:
    """A tokenised split: ids, labels and one Segment per encoder pass (2 for separate pairs)."""

    task: str
    split: str
    ids: list[str]
    labels: torch.Tensor | None  # (N,) float32; class ids for classification
    segments: list[Segment]
    source_key: str = ""  # the source file's token cache key (its bytes, tokenizer, max length, pair encoding)
    source_rows: torch.Tensor | None = None  # (N,) each row's index in the source file's rows
    features: list[torch.Tensor] | None = None  # a frozen encoder's vectors per pass, (N, hidden) (features.py)

    def __post_init__(self):
        if self.source_rows is None:
            self.source_rows = torch.arange(len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> torch.Tensor:
        """Longest segment per row, for length-sorted evaluation and bucketing."""
        per_seg = [s.offsets[1:] - s.offsets[:-1] for s in self.segments]
        return torch.stack(per_seg).amax(0)

    def subset(self, rows: torch.Tensor) -> EncodedSplit:
        """The rows given (a 1-D index tensor), re-packed."""
        segs = []
        for s in self.segments:
            pieces = [s.ids[s.offsets[i] : s.offsets[i + 1]] for i in rows.tolist()]
            types = (
                [s.token_types[s.offsets[i] : s.offsets[i + 1]] for i in rows.tolist()]
                if s.token_types is not None
                else None
            )
            segs.append(_pack(pieces, types))
        labels = self.labels[rows] if self.labels is not None else None
        ids = [self.ids[i] for i in rows.tolist()]
        return EncodedSplit(self.task, self.split, ids, labels, segs, self.source_key, self.source_rows[rows])


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        for key in ("truncation", "padding"):  # call-time settings, changed by every tokenizer call
            state.pop(key, None)
        blob = json.dumps(state, sort_keys=True)
    else:
        blob = repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}|{blob}".encode()).hexdigest()[:16]


def encode_split(
    split: Split,
    tokenizer,
    max_length: int,
    pair_encoding: str,
    cache_dir: str | Path | None,
    tokenizer_id: str | None = None,
) -> EncodedSplit:
    """Tokenise a split, reading from / writing to the on-disk cache when `cache_dir` is set."""
    if pair_encoding not in ("separate", "cross"):
        raise ValueError(f"data.pair_encoding must be 'separate' or 'cross', got {pair_encoding!r}")
    labels = torch.tensor(split.labels, dtype=torch.float32) if split.labels is not None else None
    key, path = "", None  # rows not read from a file (peft-predict's stdin, load_run) have no cache key
    if cache_dir is not None:
        digest = hashlib.sha256(split.path.read_bytes()).hexdigest()[:16]
        tok = tokenizer_id or tokenizer_fingerprint(tokenizer)
        skipped = hashlib.sha256("\n".join(split.skipped).encode()).hexdigest()[:8]
        key = f"{split.task}-{split.split}-{digest}-{tok}-L{max_length}-{pair_encoding}-{skipped}-v{CACHE_VERSION}"
        path = Path(cache_dir) / f"{key}.pt"
    if path is not None and path.is_file():
        segs = _read_cached(path, len(split))
        if segs is not None:
            return EncodedSplit(split.task, split.split, split.ids, labels, segs, key)
    segs = _tokenise(split, tokenizer, max_length, pair_encoding)
    if path is not None:
        cache = {"segments": [s.__dict__ for s in segs], "sha256": _checksum(segs)}
        atomic_write(path, lambda f: torch.save(cache, f), binary=True)
    return EncodedSplit(split.task, split.split, split.ids, labels, segs, key)


def _checksum(segs: list[Segment]) -> str:
    h = hashlib.sha256()
    for s in segs:
        for t in (s.ids, s.offsets, s.token_types):
            h.update(b"-" if t is None else t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _read_cached(path: Path, n_rows: int) -> list[Segment] | None:
    """A cache entry's segments, or None (and a warning) when it is truncated, corrupt or of another shape."""
    try:
        entry = torch.load(path, weights_only=True)
        segs = [Segment(**s) for s in entry["segments"]]
        if entry["sha256"] == _checksum(segs) and all(len(s.offsets) == n_rows + 1 for s in segs):
            return segs
        problem = "its checksum or row count does not match"
    except Exception as err:  # truncated zip, unpickling error, an entry of an older layout
        problem = f"it does not load ({type(err).__name__})"
    log.warning("token cache %s: %s; rebuilding it", path, problem)
    return None


def _tokenise(split: Split, tokenizer, max_length: int, pair_encoding: str) -> list[Segment]:
    columns = list(zip(*split.texts))
    if len(columns) == 2 and pair_encoding == "cross":
        enc = tokenizer(list(columns[0]), list(columns[1]), truncation=True, max_length=max_length)
        types = [torch.tensor(t, dtype=torch.int8) for t in enc["token_type_ids"]]
        return [_pack([torch.tensor(i, dtype=torch.int32) for i in enc["input_ids"]], types)]
    segs = []
    for col in columns:
        enc = tokenizer(list(col), truncation=True, max_length=max_length)
        segs.append(_pack([torch.tensor(i, dtype=torch.int32) for i in enc["input_ids"]], None))
    return segs


def _pack(pieces: list[torch.Tensor], types: list[torch.Tensor] | None) -> Segment:
    lengths = torch.tensor([len(p) for p in pieces], dtype=torch.int64)
    offsets = torch.zeros(len(pieces) + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    ids = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32)
    tt = torch.cat(types) if types else None
    return Segment(ids, offsets, tt)


def collate(data: EncodedSplit, rows: list[int] | tuple[int, ...], pad_id: int = 0, multiple: int = 1) -> dict:
    """Build one dynamically padded batch of the given rows.

    The width is the longest row, rounded up to `multiple` (bucketed shapes, so a compiled
    encoder sees a few distinct lengths instead of one per batch).

    Returns a dict with `inputs` (one dict of input_ids / attention_mask / token_type_ids per
    encoder pass, each (B, T_max)), `labels` (B,) when the split has labels, and `index` (B,).
    """
    rows_t = torch.as_tensor(list(rows), dtype=torch.int64)
    if data.features is not None:  # a frozen encoder's cached vectors: no token ids needed
        batch = {"features": [f[rows_t] for f in data.features], "index": rows_t}
        if data.labels is not None:
            batch["labels"] = data.labels[rows_t]
        return batch
    inputs = []
    for s in data.segments:
        starts, ends = s.offsets[rows_t], s.offsets[rows_t + 1]
        lens = ends - starts
        width = -(-int(lens.max()) // multiple) * multiple
        ids = torch.full((len(rows_t), width), pad_id, dtype=torch.long)
        types = torch.zeros((len(rows_t), width), dtype=torch.long)
        for j, (a, n) in enumerate(zip(starts.tolist(), lens.tolist())):
            ids[j, :n] = s.ids[a : a + n]
            if s.token_types is not None:
                types[j, :n] = s.token_types[a : a + n]
        mask = (torch.arange(width)[None, :] < lens[:, None]).long()
        inputs.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    batch = {"inputs": inputs, "index": rows_t}
    if data.labels is not None:
        batch["labels"] = data.labels[rows_t]
    return batch
