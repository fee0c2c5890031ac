"""Shared fixtures: a tiny random-init BERT folder and synthetic task data, both made here."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from peft_lightning.encoder import BertEncoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on two cores: one thread a worker, and for the processes its tests start. torch's
    # default (a thread per core in each worker) oversubscribes the cores, and then every op waits
    # for a descheduled thread of its own pool: a tiny model's step took seconds, not milliseconds.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PEFT_SHARED_DATA", ROOT.parent / "shared" / "data"))

POS = ["good", "great", "fine", "lovely", "superb"]
NEG = ["bad", "awful", "poor", "boring", "dull"]
NOUNS = ["movie", "film", "story", "plot", "cast", "man", "woman", "dog", "cat", "guitar", "car", "city"]
VERBS = ["plays", "drives", "likes", "sees", "eats"]
FILLER = ["the", "a", "is", "was", "very", "quite", "what", "how", "why", "do", "i", "you", "can", "?", "."]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(POS + NEG + NOUNS + VERBS + FILLER))]


def make_model_dir(path: Path, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> Path:
    """A BertModel folder with random weights and a word-level vocab (loads with from_pretrained)."""
    import torch
    from transformers import BertConfig, BertModel

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    cfg = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(path)
    return path


def sentiment_row(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(5)
    words = [rng.choice(FILLER), rng.choice(NOUNS), "is"]
    words += [rng.choice(POS if label >= 3 else NEG) for _ in range(abs(label - 2))] or ["quite"]
    return " ".join(words), label


def pair_row(rng: random.Random) -> tuple[str, str, int, float]:
    a = [rng.choice(FILLER), rng.choice(NOUNS), rng.choice(VERBS), rng.choice(NOUNS)]
    same = rng.random() < 0.4
    b = list(a) if same else [rng.choice(FILLER), rng.choice(NOUNS), rng.choice(VERBS), rng.choice(NOUNS)]
    overlap = sum(x == y for x, y in zip(a, b))
    return " ".join(a), " ".join(b), int(same), round(5.0 * overlap / 4, 3)


def write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def make_data_dir(path: Path, n_train: int = 48, n_dev: int = 16, n_test: int = 12, seed: int = 0) -> Path:
    """Synthetic SST-5 / QQP / STS-B splits in the TSV layout, with a learnable signal."""
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        labelled = split != "test"
        sst, qqp, sts = [], [], []
        for i in range(n):
            s, y = sentiment_row(rng)
            sst.append([f"s{split}{i:04d}", s] + ([y] if labelled else []))
            a, b, dup, score = pair_row(rng)
            qqp.append([str(1000 + i), a, b] + ([dup] if labelled else []))
            a, b, dup, score = pair_row(rng)
            sts.append([f"{split}-{i:04d}", a, b] + ([f"{score:.3f}"] if labelled else []))
        write_tsv(path / "sst5" / f"{split}.tsv", ["id", "sentence"] + (["label"] if labelled else []), sst)
        write_tsv(
            path / "qqp" / f"{split}.tsv", ["id", "sentence1", "sentence2"] + (["label"] if labelled else []), qqp
        )
        write_tsv(
            path / "stsb" / f"{split}.tsv", ["id", "sentence1", "sentence2"] + (["score"] if labelled else []), sts
        )
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return make_data_dir(tmp_path / "data")


@pytest.fixture
def tiny_tokenizer(tiny_model_dir):
    from peft_lightning.backbone import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def compose(overrides: list[str]):
    """The real Hydra config from conf/, composed with overrides (as `peft-train` would)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import peft_lightning.train  # noqa: F401  (registers the run_name resolver)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides, return_hydra_config=False)


def tiny_overrides(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "model=local",
        f"model.source={model_dir}",
        f"data.dir={data_dir}",
        f"data.cache_dir={out / 'cache'}",
        f"output_dir={out}",
        "overrides=[]",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "optim.lr=3e-3",
        "data.max_length=64",  # the tiny model's positions
        *extra,
    ]


# ---- encoders and adapters: shared by the encoder and adapter tests ------------------------------

# LoRA / DoRA against PEFT: our targets and scaling, and PEFT's target_modules, lora_alpha, use_rslora
PEFT_CASES = [
    (["all"], "fixed", "all-linear", 8, False),
    (["query", "value"], "fixed", ["query", "value"], 8, False),
    (["all"], "alpha_over_r", "all-linear", 16, False),
    (["query", "value"], "alpha_over_r", ["query", "value"], 16, False),
    (["all"], "rslora", "all-linear", 16, True),
    (["query", "value"], "rslora", ["query", "value"], 16, True),
]

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft (pip install -e '.[dev]')")


def tiny_config(**kw) -> BertConfig:
    base = dict(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    base.update(kw)
    return BertConfig(**base)


def pair(seed: int = 0, **kw) -> tuple[BertModel, BertEncoder]:
    torch.manual_seed(seed)
    hf = BertModel(tiny_config(**kw)).eval()
    ours = BertEncoder(hf.config)
    ours.load_state_dict(hf.state_dict())
    return hf, ours.eval()


def inputs(B: int = 3, T: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, 4:] = 1
    return ids, mask, types


def assert_encodes_like(ours: BertEncoder, reference, adapted: bool = False):
    """Our encoder's hidden states (real tokens) and pooler output equal `reference`'s (a BertModel,
    or a PEFT model around one) on `inputs()`; with `adapted`, they also differ from the plain
    encoder's (the adapter is in use). Returns our hidden states and the reference's output."""
    ids, mask, types = inputs()
    ref = reference(input_ids=ids, attention_mask=mask, token_type_ids=types)
    h = ours(ids, mask, types)
    real = mask.bool()
    assert torch.allclose(h[real], ref.last_hidden_state[real], atol=1e-5)
    assert torch.allclose(ours.pool(h, mask, "pooler"), ref.pooler_output, atol=1e-5)
    if adapted:
        with torch.no_grad():
            assert (pair()[1](ids, mask, types)[real] - h[real]).abs().max() > 1e-2
    return h, ref


def randomise_lora_like(encoder: BertEncoder, kind, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in encoder.modules():
        if isinstance(m, kind):
            m.lora_A.data = torch.randn(m.lora_A.shape, generator=g) * 0.1
            m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.1


def assert_merges_exactly(adapter, ours) -> None:
    """Merged equals unmerged to 1e-5 (fp32); unmerging gives back every frozen weight bit for bit."""
    ids, mask, types = inputs()
    frozen_before = {n: p.clone() for n, p in ours.named_parameters() if not p.requires_grad}
    unmerged = ours(ids, mask, types)
    adapter.merge()
    assert all(m.merged for m in adapter.layers)
    assert torch.allclose(ours(ids, mask, types), unmerged, atol=1e-5)
    adapter.unmerge()
    for n, p in ours.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n
    assert torch.equal(ours(ids, mask, types), unmerged)


def assert_stays_unmerged_in_16_bit(adapter, ours) -> None:
    """With the frozen weights in bf16 (the GPU fast path), merging does nothing and changes nothing."""
    for layer in adapter.layers:
        layer.base.weight.data = layer.base.weight.data.to(torch.bfloat16)
    ids, mask, types = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unmerged = ours(ids, mask, types)
        adapter.merge()
        assert not any(m.merged for m in adapter.layers)
        assert torch.equal(ours(ids, mask, types), unmerged)


def bert_base_encoder(pooler: bool = True) -> BertEncoder:
    with torch.device("meta"):
        return BertEncoder(BertConfig(), add_pooler=pooler)


def trainable(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skipped (not failed) on machines without it, like CI's."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def wandb_records(path: Path) -> list:
    """The records of a wandb offline run file (`run-<id>.wandb`), parsed: the file is wandb's
    LevelDB-style log (a 7-byte header, then 32 KiB blocks of chunks: crc32, length, type) of
    `wandb_internal_pb2.Record` protobufs."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path}: not a wandb run file"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += data
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def wandb_run(run_dir: Path) -> dict:
    """A run folder's wandb offline run: its tags, group, name, summary and logged history rows."""
    import json as _json
    import time as _time

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = {"tags": [], "group": None, "name": None, "summary": {}, "history": []}
    # wandb's service may still be writing the file's last records (the final summary, then `exit`)
    # when wandb.finish() has returned, on a loaded machine: read it once `exit` is in it
    deadline = _time.monotonic() + 60
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)):
        assert _time.monotonic() < deadline, f"{path}: no exit record after 60 s (the run never finished)"
        _time.sleep(0.2)
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(tags=list(rec.run.tags), group=rec.run.run_group, name=rec.run.display_name)
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = _json.loads(item.value_json)
        elif kind == "history":
            out["history"].append(
                {i.key or "/".join(i.nested_key): _json.loads(i.value_json) for i in rec.history.item}
            )
    return out


TEXT_COLUMNS = {
    "adapter",
    "status",
    "strategy",
    "epoch",
    "machine",
}  # settings, how a run ended, where; the rest numbers


def assert_numeric_csvs(folder: Path) -> None:
    """Every CSV the report wrote: each cell of a column that is not a setting or a status parses as a number."""
    import csv

    for path in sorted(folder.glob("*.csv")):
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            for column, cell in row.items():
                if column in TEXT_COLUMNS or "." in column.split(" ")[0] or not cell:
                    continue  # a setting (adapter.rank, ...), a status, or a row without that number
                float(cell)  # raises on display text ("0.40 ± 0.02", "1,627,016", "[0.1, 0.2] n=2")
