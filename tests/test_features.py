"""The frozen encoder computed once: cached vectors, the same results, a cache that is rebuilt when it must."""

import logging
import shutil

import pytest
import torch
from conftest import compose, make_data_dir, tiny_overrides, write_tsv

from peft_lightning.build import build
from peft_lightning.data.encoded import collate
from peft_lightning.features import FeatureCache
from peft_lightning.train import train

TIMES = {"wall_time_s", "train_time_s", "step_time_ms", "steady_step_ms", "peak_memory_mb", "timing"}
EPOCH_TIMES = {"elapsed_s", "train_s", "steady_s", "eval_s", "timing"}


def frozen_model(tiny_model_dir, data_dir, out, *extra):
    cfg = compose(tiny_overrides(tiny_model_dir, data_dir, out, "adapter=frozen", *extra))
    _, dm, module = build(cfg)
    dm.setup()
    module.model.eval()
    return dm, module.model


def read_tsv(path):
    return [line.split("\t") for line in path.read_text().splitlines()]


def without_times(res: dict) -> dict:
    res = {k: v for k, v in res.items() if k not in TIMES}
    res["history"] = [{k: v for k, v in h.items() if k not in EPOCH_TIMES} for h in res["history"]]
    res["best"] = {k: v for k, v in res["best"].items() if k not in EPOCH_TIMES}
    res["config"] = {k: v for k, v in res["config"].items() if k not in ("output_dir", "feature_cache")}
    res["config"]["data"] = {k: v for k, v in res["config"]["data"].items() if k != "cache_dir"}
    res.pop("run_name")
    return res


def test_cached_and_uncached_frozen_runs_give_the_same_results(tiny_model_dir, data_dir, tmp_path):
    args = ("adapter=frozen", "trainer.max_epochs=2", "model.head_dropout=0.3")
    runs = {}
    for cached in ("true", "false"):
        out = tmp_path / cached
        runs[cached] = train(compose(tiny_overrides(tiny_model_dir, data_dir, out, *args, f"feature_cache={cached}")))
    cached, plain = runs["true"], runs["false"]
    assert cached["timing"]["features"] > 0 and plain["timing"]["features"] == 0
    a, b = without_times(cached), without_times(plain)
    assert a.keys() == b.keys()
    for key in a:
        if key != "history" and key != "best":
            assert a[key] == b[key], key
    for ha, hb in zip(a["history"] + [a["best"]], b["history"] + [b["best"]]):
        assert ha.keys() == hb.keys()
        splits = [s for s in ("train", "dev", "select", "train_eval") if s in ha]
        flat = {(s, t, m): v for s in splits for t, ms in ha[s].items() for m, v in ms.items()}
        other = {(s, t, m): v for s in splits for t, ms in hb[s].items() for m, v in ms.items()}
        assert flat and flat == pytest.approx(other, abs=1e-5)
        assert {k: v for k, v in ha.items() if k not in splits} == pytest.approx(
            {k: v for k, v in hb.items() if k not in splits}, abs=1e-5
        )
    for path in sorted((tmp_path / "true" / "predictions").glob("*.tsv")):
        mine, theirs = read_tsv(path), read_tsv(tmp_path / "false" / "predictions" / path.name)
        assert [r[0] for r in mine] == [r[0] for r in theirs]
        assert [float(r[1]) for r in mine[1:]] == pytest.approx([float(r[1]) for r in theirs[1:]], abs=1e-5)


def test_a_frozen_encoder_trains_in_eval_mode(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """Lightning restores the modes it saw after validation: the frozen encoder must stay in eval mode
    (no dropout) through every training step, or cached vectors would differ from what it computes."""
    import peft_lightning.model as model_module

    modes = []
    encode = model_module.MultiTaskModel.encode

    def spy(self, passes):
        if self.training:
            modes.append({m.training for m in self.encoder.modules()})
        return encode(self, passes)

    monkeypatch.setattr(model_module.MultiTaskModel, "encode", spy)
    train(compose(tiny_overrides(tiny_model_dir, data_dir, tmp_path, "adapter=frozen", "feature_cache=false")))
    assert modes and all(m == {False} for m in modes)


def test_vectors_are_those_of_the_encoder_in_row_order_each_distinct_sentence_once(tiny_model_dir, tmp_path):
    data = make_data_dir(tmp_path / "data")
    # repeat STS-B dev sentences across pairs, as QQP and STS-B do
    rows = [r.split("\t") for r in (data / "stsb" / "dev.tsv").read_text().splitlines()]
    header, body = rows[0], rows[1:]
    for i in range(0, len(body) - 1, 2):
        body[i + 1][2] = body[i][1]  # sentence2 of row i+1 = sentence1 of row i
    body[3][1] = body[0][1]
    write_tsv(data / "stsb" / "dev.tsv", header, body)
    dm, model = frozen_model(tiny_model_dir, data, tmp_path / "run")
    split = dm.split("stsb", "dev")
    cache = FeatureCache(tmp_path / "features", model, batch_size=3, pad_id=dm.pad_id)
    vectors = cache.features(split)
    texts = {s for r in body for s in (r[1], r[2])}
    assert cache.computed <= len(texts) < 2 * len(body)  # each distinct sentence once (fewer if they tokenise alike)
    with torch.no_grad():  # the unsorted, undeduplicated path: the rows as one padded batch each pass
        direct = model.encode(collate(split, list(range(len(split))), dm.pad_id)["inputs"])
    for got, want in zip(vectors, direct):
        assert got.shape == want.shape == (len(body), model.encoder.config.hidden_size)
        assert torch.allclose(got, want, atol=1e-5)
    # read back: nothing is computed again
    again = FeatureCache(tmp_path / "features", model, batch_size=3, pad_id=dm.pad_id)
    assert all(torch.equal(a, b) for a, b in zip(again.features(split), vectors)) and again.computed == 0


def test_the_cache_is_rebuilt_when_a_data_file_max_length_or_the_file_itself_changes(tiny_model_dir, tmp_path, caplog):
    data = make_data_dir(tmp_path / "data")
    folder = tmp_path / "features"

    def computed(data_dir, *extra):
        dm, model = frozen_model(tiny_model_dir, data_dir, tmp_path / "run", *extra)
        cache = FeatureCache(folder, model, pad_id=dm.pad_id)
        cache.features(dm.split("sst5", "dev"))
        return cache.computed

    first = computed(data)
    assert first > 0 and computed(data) == 0
    assert computed(data, "data.max_length=8") > 0  # another truncation: other vectors
    rows = [r.split("\t") for r in (data / "sst5" / "dev.tsv").read_text().splitlines()]
    rows[1][1] = "an edited sentence about a film"
    write_tsv(data / "sst5" / "dev.tsv", rows[0], rows[1:])
    assert computed(data) > 0  # the file's bytes changed
    # a truncated cache file is rebuilt, with a warning naming it
    for path in folder.glob("*.pt"):
        path.write_bytes(path.read_bytes()[:100])
    caplog.set_level(logging.WARNING)
    assert computed(data) > 0
    assert "feature cache" in caplog.text and "rebuilding it" in caplog.text


def test_a_sample_computes_its_own_rows_and_the_next_sample_only_its_new_ones(tiny_model_dir, tmp_path):
    data = make_data_dir(tmp_path / "data", n_train=40)
    folder = tmp_path / "features"
    counts = []
    for seed in (1, 2):
        dm, model = frozen_model(tiny_model_dir, data, tmp_path / "run", "data.limit_train=12", f"seed={seed}")
        cache = FeatureCache(folder, model, pad_id=dm.pad_id)
        split = dm.split("sst5", "train")
        vectors = cache.features(split)
        counts.append((cache.computed, len(split)))
        with torch.no_grad():
            direct = model.encode(collate(split, list(range(len(split))), dm.pad_id)["inputs"])
        assert torch.allclose(vectors[0], direct[0], atol=1e-5)
    (first, n1), (second, n2) = counts
    assert first <= n1 == 12 and second < n2  # the second sample shares rows with the first
    shutil.rmtree(folder)
