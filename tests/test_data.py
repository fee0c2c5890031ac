"""Readers, bad input, the token cache, subsampling and the multi-task schedules."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import write_tsv

from peft_lightning.data import DataError, MultiTaskDataModule, ScheduleSampler, read_split
from peft_lightning.data import encoded as encoded_mod
from peft_lightning.data.encoded import collate, encode_split
from peft_lightning.tasks import TASKS


def test_reads_tsv_with_csv_quoting(tmp_path):
    path = tmp_path / "sst5" / "train.tsv"
    path.parent.mkdir(parents=True)
    path.write_text('id\tsentence\tlabel\na1\t"He said ""no"" ."\t3\na2\tplain `` text \'\'\t0\n')
    split = read_split(tmp_path, TASKS["sst5"], "train")
    assert split.ids == ["a1", "a2"]
    assert split.texts == [('He said "no" .',), ("plain `` text ''",)]
    assert split.labels == [3.0, 0.0]


def test_reads_cs224n_layout(tmp_path):
    (tmp_path / "ids-sst-train.csv").write_text("\tid\tsentence\tsentiment\n0\tabc\tgood film\t4\n")
    (tmp_path / "quora-dev.csv").write_text("\tid\tsentence1\tsentence2\tis_duplicate\n0\tq7\thow ?\twhy ?\t1.0\n")
    (tmp_path / "sts-test-student.csv").write_text("\tid\tsentence1\tsentence2\n0\tt1\ta b\tc d\n")
    sst = read_split(tmp_path, TASKS["sst5"], "train")
    qqp = read_split(tmp_path, TASKS["qqp"], "dev")
    sts = read_split(tmp_path, TASKS["stsb"], "test")
    assert (sst.ids, sst.labels) == (["abc"], [4.0])
    assert (qqp.ids, qqp.texts, qqp.labels) == (["q7"], [("how ?", "why ?")], [1.0])
    assert (sts.ids, sts.labels) == (["t1"], None)


def test_test_split_needs_no_labels(data_dir):
    split = read_split(data_dir, TASKS["stsb"], "test")
    assert split.labels is None and len(split) == 12


BAD = [
    ("sst5", "id\tsentence\tlabel\nx\tok\t5\n", "field 'label'", "0..4"),
    ("sst5", "id\tsentence\tlabel\nx\tok\t-1\n", ":2:", "0..4"),
    ("sst5", "id\tsentence\tlabel\nx\tok\t2.5\n", "field 'label'", "integer class"),
    ("qqp", "id\tsentence1\tsentence2\tlabel\n1\ta\tb\t2\n", "field 'label'", "0 or 1"),
    ("qqp", "id\tsentence1\tsentence2\tlabel\n1\ta\tb\tyes\n", "not a number", "0 or 1"),
    ("stsb", "id\tsentence1\tsentence2\tscore\n1\ta\tb\thigh\n", "field 'score'", "between 0 and 5"),
    ("stsb", "id\tsentence1\tsentence2\tscore\n1\ta\tb\tnan\n", "not finite", "between 0 and 5"),
    ("stsb", "id\tsentence1\tsentence2\tscore\n1\ta\tb\t5.5\n", "outside 0..5", "between 0 and 5"),
    ("stsb", "id\tsentence1\tscore\n1\ta\t3\n", "missing column(s) ['sentence2']", ":1:"),
    ("qqp", "id\tsentence1\tsentence2\tlabel\n1\ta\tb\t0\n2\tc\td\t1\n1\te\tf\t0\n", "repeats line 2", ":4:"),
    ("sst5", "id\tsentence\tlabel\nx\t\t1\n", "field 'sentence': empty", ":2:"),
]


@pytest.mark.parametrize("task,text,needle,expect", BAD)
def test_bad_rows_name_file_line_and_field(tmp_path, task, text, needle, expect):
    path = tmp_path / task / "train.tsv"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(DataError) as err:
        read_split(tmp_path, TASKS[task], "train")
    msg = str(err.value)
    assert str(path) in msg and needle in msg and expect in msg


def test_empty_file_and_header_only(tmp_path):
    path = tmp_path / "sst5" / "dev.tsv"
    path.parent.mkdir(parents=True)
    path.write_text("")
    with pytest.raises(DataError, match="file is empty"):
        read_split(tmp_path, TASKS["sst5"], "dev")
    path.write_text("id\tsentence\tlabel\n")
    with pytest.raises(DataError, match="no data rows"):
        read_split(tmp_path, TASKS["sst5"], "dev")


def test_missing_dir_and_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_split(tmp_path / "nope", TASKS["sst5"], "train")
    (tmp_path / "sst5").mkdir()
    with pytest.raises(DataError, match=r"sst5/train.tsv: file not found"):
        read_split(tmp_path, TASKS["sst5"], "train")


def test_skip_bad_rows_keeps_the_good_ones(tmp_path):
    path = tmp_path / "qqp" / "train.tsv"
    path.parent.mkdir(parents=True)
    path.write_text("id\tsentence1\tsentence2\tlabel\n1\ta\tb\t0\n2\t\td\t1\n3\te\tf\t7\n4\tg\th\t1\n")
    split = read_split(tmp_path, TASKS["qqp"], "train", on_bad_row="skip")
    assert split.ids == ["1", "4"] and len(split.skipped) == 2 and ":3:" in split.skipped[0]


def test_token_cache_is_reused_and_keyed_by_content(data_dir, tiny_tokenizer, tmp_path, monkeypatch):
    split = read_split(data_dir, TASKS["qqp"], "train")
    first = encode_split(split, tiny_tokenizer, 32, "separate", tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.pt"))) == 1

    def boom(*a, **k):
        raise AssertionError("tokenised again although cached")

    monkeypatch.setattr(encoded_mod, "_tokenise", boom)
    again = encode_split(split, tiny_tokenizer, 32, "separate", tmp_path / "c")
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(first.segments, again.segments))
    with pytest.raises(AssertionError, match="tokenised again"):  # another max length is another key
        encode_split(split, tiny_tokenizer, 16, "separate", tmp_path / "c")
    monkeypatch.undo()
    # a changed file is another key too
    path = data_dir / "qqp" / "train.tsv"
    path.write_text(path.read_text().replace("\t0\n", "\t1\n", 1))
    encode_split(read_split(data_dir, TASKS["qqp"], "train"), tiny_tokenizer, 32, "separate", tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.pt"))) == 2  # the L=16 attempt above saved nothing


def test_encodings_separate_and_cross(data_dir, tiny_tokenizer):
    split = read_split(data_dir, TASKS["stsb"], "dev")
    sep = encode_split(split, tiny_tokenizer, 32, "separate", None)
    cross = encode_split(split, tiny_tokenizer, 32, "cross", None)
    assert len(sep.segments) == 2 and len(cross.segments) == 1
    batch = collate(cross, [0, 3])
    enc = batch["inputs"][0]
    row = enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()
    cls, sep_id = tiny_tokenizer.cls_token_id, tiny_tokenizer.sep_token_id
    assert row[0] == cls and row.count(sep_id) == 2
    assert enc["token_type_ids"][0].max() == 1  # second sentence has segment 1
    b = collate(sep, [0, 1, 2])
    assert b["labels"].shape == (3,) and b["index"].tolist() == [0, 1, 2]
    for enc in b["inputs"]:  # dynamic padding: width is the longest row, padded with 0
        lens = enc["attention_mask"].sum(1)
        assert enc["input_ids"].shape[1] == int(lens.max())
        assert (enc["input_ids"][enc["attention_mask"] == 0] == 0).all()


def test_limit_train_is_seeded(data_dir, tiny_tokenizer, tmp_path):
    def rows(seed):
        dm = MultiTaskDataModule(data_dir, tiny_tokenizer, limit_train=10, seed=seed, cache_dir=tmp_path)
        dm.setup()
        return {t: dm.split(t, "train").ids for t in dm.task_names}

    a, b, c = rows(1), rows(1), rows(2)
    assert a == b and a != c and all(len(v) == 10 for v in a.values())


def keys_of(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


SIZES = {"sst5": 20, "qqp": 50, "stsb": 9}
BS = {"sst5": 4, "qqp": 8, "stsb": 3}  # batches per pass: 5, 7, 3


def test_joint_schedule_covers_the_largest_task_and_cycles_the_rest():
    s = ScheduleSampler(SIZES, BS, "joint", seed=3)
    keys = keys_of(s, 0)
    assert len(keys) == len(s) == 7
    assert all([t for t, _ in k] == ["sst5", "qqp", "stsb"] for k in keys)
    qqp_rows = [r for k in keys for t, rows in k if t == "qqp" for r in rows]
    assert sorted(qqp_rows) == list(range(50))  # every row exactly once
    sst_rows = Counter(r for k in keys for t, rows in k if t == "sst5" for r in rows)
    assert set(sst_rows) == set(range(20))  # smaller task cycles: every row seen, some twice
    assert all(len(rows) <= BS[t] for k in keys for t, rows in k)


def test_round_robin_alternates_tasks():
    s = ScheduleSampler(SIZES, BS, "round_robin", seed=0)
    keys = keys_of(s, 0)
    assert len(keys) == 21
    assert [k[0][0] for k in keys[:6]] == ["sst5", "qqp", "stsb"] * 2
    stsb = [r for k in keys for t, rows in k if t == "stsb" for r in rows]
    assert set(stsb) == set(range(9)) and len(stsb) >= 9


@pytest.mark.parametrize("schedule,temp", [("proportional", 1.0), ("temperature", 1e6)])
def test_sampled_schedules_follow_their_probabilities(schedule, temp):
    big = {"sst5": 800, "qqp": 3200, "stsb": 400}
    s = ScheduleSampler(big, dict.fromkeys(big, 4), schedule, temperature=temp, seed=0)
    keys = keys_of(s, 0)
    assert len(keys) == 200 + 800 + 100
    share = Counter(k[0][0] for k in keys)
    if schedule == "proportional":
        expected = {"sst5": 0.2, "qqp": 0.8 * 4 / 4.4 * 1.1, "stsb": 0.1}
        assert s.task_probabilities() == pytest.approx({"sst5": 800 / 4400, "qqp": 3200 / 4400, "stsb": 400 / 4400})
        assert share["qqp"] / len(keys) == pytest.approx(3200 / 4400, abs=0.05)
        del expected
    else:  # very high temperature: uniform
        assert all(v == pytest.approx(1 / 3, abs=1e-3) for v in s.task_probabilities().values())
        assert all(abs(share[t] / len(keys) - 1 / 3) < 0.06 for t in big)


@pytest.mark.parametrize("schedule", ["joint", "round_robin", "proportional", "temperature"])
def test_schedules_are_seeded_per_epoch(schedule):
    s = ScheduleSampler(SIZES, BS, schedule, seed=5)
    assert keys_of(s, 0) == keys_of(s, 0)
    assert keys_of(s, 0) != keys_of(s, 1)
    other = ScheduleSampler(SIZES, BS, schedule, seed=6)
    assert keys_of(s, 2) != keys_of(other, 2)


@pytest.mark.parametrize("schedule", ["joint", "round_robin", "proportional"])
@pytest.mark.parametrize("parts", [2, 3, 7])
def test_epoch_parts_cut_a_pass_into_consecutive_epochs(schedule, parts):
    """K Lightning epochs of a sampler with parts=K are exactly one epoch of the same sampler without
    parts: the same steps, in order, pass after pass; Lightning sizes epochs by the first, the longest."""
    whole = ScheduleSampler(SIZES, BS, schedule, seed=5)
    cut = ScheduleSampler(SIZES, BS, schedule, seed=5, parts=parts)
    for p in (0, 1):
        pieces = [keys_of(cut, p * parts + k) for k in range(parts)]
        assert [key for piece in pieces for key in piece] == keys_of(whole, p)
        lengths = [len(piece) for piece in pieces]
        assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True) and min(lengths) >= 1
        assert [(cut.set_epoch(p * parts + k), len(cut))[1] for k in range(parts)] == lengths


def test_epoch_parts_are_dealt_to_ddp_ranks_part_by_part():
    whole = ScheduleSampler(SIZES, BS, "joint", seed=1, parts=2)
    ranks = [ScheduleSampler(SIZES, BS, "joint", seed=1, parts=2) for _ in range(2)]
    for r, s in enumerate(ranks):
        s.shard(r, 2)
    for epoch in (0, 1):
        part = keys_of(whole, epoch)  # 4 then 3 of the pass's 7 steps
        dealt = [keys_of(s, epoch) for s in ranks]
        assert dealt[0] == part[0::2] and dealt[1][: len(part[1::2])] == part[1::2]
        assert len(dealt[0]) == len(dealt[1]) == -(-len(part) // 2)


@pytest.mark.parametrize(
    "parts,match",
    [(8, "data.epoch_parts=8 is more than the 7 steps of a pass"), (0, "data.epoch_parts must be a whole number >= 1")],
)
def test_epoch_parts_are_checked(parts, match):
    with pytest.raises(ValueError, match=match):
        ScheduleSampler(SIZES, BS, "joint", parts=parts)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="data.schedule='mixed' is unknown"):
        ScheduleSampler(SIZES, BS, "mixed")


def test_datamodule_batches(data_dir, tiny_tokenizer, tmp_path):
    dm = MultiTaskDataModule(
        data_dir, tiny_tokenizer, batch_size={"sst5": 4, "qqp": 8, "stsb": 2}, cache_dir=tmp_path, select_on="dev"
    )  # the study's protocol: every training row trains
    dm.setup()
    steps = list(dm.train_dataloader())
    assert len(steps) == 24  # stsb: 48 rows / 2
    first = steps[0]
    assert set(first) == {"sst5", "qqp", "stsb"}
    assert first["sst5"]["labels"].shape == (4,) and len(first["sst5"]["inputs"]) == 1
    assert first["qqp"]["labels"].shape == (8,) and len(first["qqp"]["inputs"]) == 2
    assert dm.val_targets() == [(t, s) for s in ("dev", "train_eval") for t in ("sst5", "qqp", "stsb")]
    dev = [b for dl in dm.val_dataloader() for b in dl]
    assert sum(len(b[t]["index"]) for b in dev for t in b if b[t]["split"] == "dev") == 3 * 16
    assert sum(len(b[t]["index"]) for b in dev for t in b if b[t]["split"] == "train_eval") == 3 * 48


def test_write_tsv_helper_roundtrip(tmp_path):
    write_tsv(tmp_path / "sst5" / "train.tsv", ["id", "sentence", "label"], [["a", 'say "hi"', 1]])
    assert read_split(tmp_path, TASKS["sst5"], "train").texts == [('say "hi"',)]


def test_peft_data_converts_hub_datasets(tmp_path):
    from datasets import Dataset

    from peft_lightning.data import read_split
    from peft_lightning.data.hub import dataset_rows, write_split
    from peft_lightning.tasks import TASKS

    sst = Dataset.from_dict(
        {"text": ["a fine film", "dull\tand\nlong"], "label": [3, 0], "label_text": ["positive", "very negative"]}
    )
    qqp = Dataset.from_dict(
        {"question1": ["how ?", "why ?"], "question2": ["what ?", "why not ?"], "label": [0, 1], "idx": [7, 9]}
    )
    sts_test = Dataset.from_dict(
        {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [-1.0, -1.0], "idx": [0, 1]}
    )
    for task, split, ds in (("sst5", "train", sst), ("qqp", "dev", qqp), ("stsb", "test", sts_test)):
        header, rows = dataset_rows(task, split, ds)
        write_split(tmp_path / task / f"{split}.tsv", header, rows)
    s = read_split(tmp_path, TASKS["sst5"], "train")
    assert s.texts == [("a fine film",), ("dull and long",)] and s.labels == [3.0, 0.0]
    q = read_split(tmp_path, TASKS["qqp"], "dev")
    assert q.ids == ["7", "9"] and q.labels == [0.0, 1.0]
    t = read_split(tmp_path, TASKS["stsb"], "test")
    assert t.ids == ["test-0000", "test-0001"] and t.labels is None


def padded_tokens(batches, lengths) -> int:
    return sum(max(lengths[r] for r in b) * len(b) for b in batches)


def test_group_by_length_batches_rows_of_similar_length():
    n, bs = 1000, 8
    lengths = torch.randint(5, 120, (n,), generator=torch.Generator().manual_seed(0))
    sizes, batch_sizes = {"sst5": n}, {"sst5": bs}
    plain = keys_of(ScheduleSampler(sizes, batch_sizes, seed=1), 0)
    grouped = ScheduleSampler(sizes, batch_sizes, seed=1, lengths={"sst5": lengths}, group_by_length=50)
    keys = keys_of(grouped, 0)
    batches = [rows for k in keys for _, rows in k]
    assert len(keys) == len(plain) == 125
    assert sorted(r for b in batches for r in b) == list(range(n))  # a pass holds every row once
    assert sum(len(b) < bs for b in batches) == 0  # 1000 = 125 x 8: no short batch
    real = int(lengths.sum())
    assert padded_tokens([rows for k in plain for _, rows in k], lengths) > 1.5 * real
    assert padded_tokens(batches, lengths) < 1.1 * real
    # the batch order is shuffled, not short-to-long: lengths of consecutive batches are not sorted
    firsts = [int(lengths[b[0]]) for b in batches]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)
    assert keys_of(grouped, 0) == keys and keys_of(grouped, 1) != keys  # seeded per epoch, as without


def test_group_by_length_keeps_a_short_last_batch_and_cycles():
    lengths = {"sst5": torch.arange(10), "qqp": torch.arange(23) % 7}
    s = ScheduleSampler({"sst5": 10, "qqp": 23}, {"sst5": 4, "qqp": 4}, lengths=lengths, group_by_length=2)
    keys = keys_of(s, 0)
    assert len(keys) == 6  # qqp: ceil(23 / 4)
    qqp = [rows for k in keys for t, rows in k if t == "qqp"]
    assert sorted(len(b) for b in qqp) == [3, 4, 4, 4, 4, 4] and sorted(r for b in qqp for r in b) == list(range(23))
    sst = [rows for k in keys for t, rows in k if t == "sst5"]  # 3 batches a pass: cycles into a second
    assert set(r for b in sst[:3] for r in b) == set(range(10))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"group_by_length": -1}, "data.group_by_length must be a whole number >= 0, got -1"),
        ({"group_by_length": 2.5}, "data.group_by_length must be a whole number >= 0, got 2.5"),
        ({"group_by_length": 4}, "data.group_by_length needs every task's row lengths"),
        ({"group_by_length": 4, "lengths": {"sst5": torch.ones(20)}}, "data.group_by_length needs every task's"),
    ],
)
def test_group_by_length_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ScheduleSampler(SIZES, BS, "joint", **kwargs)


def test_datamodule_groups_training_batches_by_length(data_dir, tiny_tokenizer, tmp_path):
    def batches(group: int) -> list[dict]:
        dm = MultiTaskDataModule(data_dir, tiny_tokenizer, batch_size=4, cache_dir=tmp_path, group_by_length=group)
        dm.setup()
        return list(dm.train_dataloader())

    def width_and_rows(steps):
        width = sum(s[t]["inputs"][0]["input_ids"].numel() for s in steps for t in s)
        rows = sorted(int(i) for s in steps for i in s["qqp"]["index"])
        return width, rows

    (plain_tokens, plain_rows), (grouped_tokens, grouped_rows) = width_and_rows(batches(0)), width_and_rows(batches(3))
    assert grouped_rows == plain_rows  # the same rows, batched differently
    assert grouped_tokens < plain_tokens  # less padding


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"batch_size": {"sst5": 8, "qqp": 0, "stsb": 8}}, r"data.batch_size.qqp must be a whole number >= 1, got 0"),
        ({"batch_size": 2.5}, r"data.batch_size.sst5 must be a whole number >= 1, got 2.5"),
        ({"pad_to_multiple_of": "abc"}, r"data.pad_to_multiple_of must be a whole number >= 1, got 'abc'"),
        ({"group_by_length": -1}, r"data.group_by_length must be a whole number >= 0, got -1"),
        ({"group_by_length": "abc"}, r"data.group_by_length must be a whole number >= 0, got 'abc'"),
        ({"temperature": 0, "schedule": "temperature"}, r"data.temperature must be a number > 0, got 0"),
        ({"max_length": 1}, r"data.max_length must be a whole number >= 2, got 1"),
    ],
)
def test_datamodule_numbers_are_checked_up_front(data_dir, tiny_tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiTaskDataModule(data_dir, tiny_tokenizer, **kwargs)
