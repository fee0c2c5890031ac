"""The frozen encoder, computed once: its pooled vectors per row, cached on disk, for the heads to train on.

With `adapter=frozen` the encoder runs in eval mode with fixed weights, so the vector a head reads
for a sentence is the same in every batch, epoch and seed. `FrozenFeatures` (a callback) computes
each split's vectors once, before training, and attaches them to the data module's splits: batches
then carry `features` in place of token ids and the model skips the encoder (`MultiTaskModel.forward`).
The heads train as before (their dropout draws the same random numbers: an encoder in eval mode
draws none), so a cached run gives the uncached run's results to float rounding.

The cache (`<data.cache_dir>/features/`) holds one file per source file and encoder: its key is the
token cache's (the file's bytes, the tokenizer, max length, pair encoding), the pooling, and a digest
of the encoder's weights. A file keeps the vectors of the rows computed so far (a 1,000-row sample
computes 1,000 rows; the next seed's sample adds its new ones), with a SHA-256 of its tensors: a
truncated or corrupt file is rebuilt, never used. Each distinct sentence is encoded once (QQP and
STS-B repeat sentences across pairs), in length-sorted batches under `torch.inference_mode`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import lightning as L
import torch

from peft_lightning.data.encoded import EncodedSplit
from peft_lightning.files import atomic_write

log = logging.getLogger(__name__)

FEATURES_VERSION = "1"


def encoder_digest(model) -> str:
    """A digest of the frozen encoder's weights and the pooling: what the vectors depend on."""
    h = hashlib.sha256(f"{type(model.encoder).__name__}|{model.pooling}".encode())
    for name, t in sorted(model.encoder.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _checksum(entry: dict) -> str:
    h = hashlib.sha256()
    for seg in entry["segments"]:
        for key in ("rows", "vectors"):
            h.update(seg[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """Pooled vectors of one frozen encoder, per source row, in `folder`.

    Args:
        folder: where the cache files go.
        model: the `MultiTaskModel` whose encoder (frozen, eval mode) and pooling make the vectors.
        batch_size: sentences a forward pass.
    """

    def __init__(self, folder: str | Path, model, batch_size: int = 64, pad_id: int = 0):
        self.folder, self.model, self.batch_size, self.pad_id = Path(folder), model, batch_size, pad_id
        self.digest = encoder_digest(model)
        self.computed = 0  # sentences encoded by this process (the rest came from disk)
        # entries read or written by this process, by path: the train, select and train_eval splits
        # share one source file, which is then read and checked once, not once a split
        self._entries: dict[Path, dict] = {}

    def path(self, split: EncodedSplit) -> Path:
        if not split.source_key:
            raise ValueError(f"{split.task} {split.split}: no token cache key (data.cache_dir) for the feature cache")
        return self.folder / f"{split.source_key}-{self.digest}-f{FEATURES_VERSION}.pt"

    def features(self, split: EncodedSplit) -> list[torch.Tensor]:
        """(len(split), hidden) float32 vectors, one tensor per encoder pass, in the split's row order."""
        path = self.path(split)
        if path not in self._entries:
            self._entries[path] = self._read(path, len(split.segments))
        entry = self._entries[path]
        source = split.source_rows.tolist()
        wanted = []  # (pass, row) pairs not in the file yet
        for k, known in enumerate(entry["segments"]):
            have = set(known["rows"].tolist())
            wanted += [(k, i) for i, r in enumerate(source) if r not in have]
        if wanted:
            vectors = self._encode(split, wanted)
            for k, known in enumerate(entry["segments"]):
                mine = [j for j, (kk, _) in enumerate(wanted) if kk == k]
                if mine:
                    rows = split.source_rows[torch.tensor([wanted[j][1] for j in mine])]
                    new = vectors[torch.tensor(mine)]
                    known["rows"] = torch.cat([known["rows"], rows])
                    known["vectors"] = torch.cat([known["vectors"].reshape(-1, new.shape[1]), new])
            entry["sha256"] = _checksum(entry)
            atomic_write(path, lambda f: torch.save(entry, f), binary=True)
        out = []
        for known in entry["segments"]:
            where = {r: i for i, r in enumerate(known["rows"].tolist())}
            out.append(known["vectors"][torch.tensor([where[r] for r in source], dtype=torch.long)])
        return out

    def _read(self, path: Path, n_segments: int) -> dict:
        empty = {"segments": [{"rows": torch.zeros(0, dtype=torch.long), "vectors": torch.zeros(0)}] * n_segments}
        empty["segments"] = [dict(s) for s in empty["segments"]]
        if not path.is_file():
            return empty
        try:
            entry = torch.load(path, weights_only=True)
            if entry.get("sha256") == _checksum(entry) and len(entry["segments"]) == n_segments:
                return entry
            problem = "its checksum or shape does not match"
        except Exception as err:  # truncated zip, unpickling error, an entry of another layout
            problem = f"it does not load ({type(err).__name__})"
        log.warning("feature cache %s: %s; rebuilding it", path, problem)
        return empty

    @torch.inference_mode()
    def _encode(self, split: EncodedSplit, wanted: list[tuple[int, int]]) -> torch.Tensor:
        """Vectors of the (pass, row) pairs given: each distinct token sequence encoded once."""
        distinct: dict[bytes, int] = {}
        first: list[tuple[int, int]] = []  # a (pass, row) of each distinct sequence
        slot = []
        for k, r in wanted:
            seg = split.segments[k]
            a, b = int(seg.offsets[r]), int(seg.offsets[r + 1])
            key = seg.ids[a:b].numpy().tobytes()
            if seg.token_types is not None:
                key += b"|" + seg.token_types[a:b].numpy().tobytes()
            if key not in distinct:
                distinct[key] = len(first)
                first.append((k, r))
            slot.append(distinct[key])
        lengths = torch.tensor([split.segments[k].length(r) for k, r in first])
        order = torch.argsort(lengths, stable=True).tolist()
        device = next(self.model.encoder.parameters()).device
        vectors = torch.empty(len(first), self.model.encoder.config.hidden_size)
        for i in range(0, len(order), self.batch_size):
            chunk = order[i : i + self.batch_size]
            batch = _batch([(split.segments[first[j][0]], first[j][1]) for j in chunk], self.pad_id)
            (pooled,) = self.model.encode([{key: v.to(device) for key, v in batch.items()}])
            vectors[torch.tensor(chunk)] = pooled.float().cpu()
        self.computed += len(first)
        return vectors[torch.tensor(slot, dtype=torch.long)]


def _batch(items: list[tuple], pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of (segment, row) sequences."""
    lens = [seg.length(r) for seg, r in items]
    width = max(lens)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(items), width), dtype=torch.long)
    for j, ((seg, r), n) in enumerate(zip(items, lens)):
        a = int(seg.offsets[r])
        ids[j, :n] = seg.ids[a : a + n]
        if seg.token_types is not None:
            types[j, :n] = seg.token_types[a : a + n]
    mask = (torch.arange(width)[None, :] < torch.tensor(lens)[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


class FrozenFeatures(L.Callback):
    """Before training: every split's vectors from the cache (computing the rows it lacks), attached
    to the data module's splits, so that batches carry them in place of token ids.

    Args:
        folder: the cache folder.
        clock: a `results.Clock`, whose `features` part gets the time this takes.
        skip: splits not to compute (test, when the run writes no test predictions); their batches
            keep their token ids.
    """

    def __init__(self, folder: str | Path, clock=None, skip: tuple[str, ...] = ()):
        self.folder, self.clock, self.skip = Path(folder), clock, skip

    def on_fit_start(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        start = time.perf_counter()
        was_training = pl_module.model.training
        pl_module.model.eval()
        cache = FeatureCache(self.folder, pl_module.model, dm.eval_batch_size, dm.pad_id)
        for split in dm.splits.values():
            if split.split not in self.skip:
                split.features = cache.features(split)
        pl_module.model.train(was_training)
        seconds = time.perf_counter() - start
        if self.clock is not None:
            self.clock.add("features", seconds)
        log.info(
            "frozen encoder: %d sentences encoded, the rest from %s (%.1f s)", cache.computed, self.folder, seconds
        )
