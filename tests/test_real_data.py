"""The real SST-5 / QQP / STS-B files beside the checkout (skipped where they are absent)."""

from __future__ import annotations

import pytest
from conftest import SHARED_DATA

from peft_lightning.data import read_split
from peft_lightning.tasks import TASKS

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "sst5").is_dir(), reason="no shared data beside the checkout")

ROWS = {
    ("sst5", "train"): 8531,
    ("sst5", "dev"): 1100,
    ("sst5", "test"): 2210,
    ("qqp", "train"): 32856,
    ("qqp", "dev"): 5000,
    ("qqp", "test"): 5000,
    ("stsb", "train"): 5690,
    ("stsb", "dev"): 1495,
    ("stsb", "test"): 1378,
}


@pytest.mark.parametrize("task,split", list(ROWS))
def test_real_files_read_cleanly(task, split):
    s = read_split(SHARED_DATA, TASKS[task], split)
    assert len(s) == ROWS[(task, split)] and len(set(s.ids)) == len(s) and not s.skipped
    if split == "test":
        assert s.labels is None
    elif task == "sst5":
        assert sorted(set(s.labels)) == [0, 1, 2, 3, 4]
    elif task == "qqp":
        assert sorted(set(s.labels)) == [0, 1]
    else:
        assert min(s.labels) >= 0 and max(s.labels) <= 5
    assert not any("\t" in t or "\n" in t for row in s.texts for t in row)


def test_csv_quoting_of_a_real_row():
    s = read_split(SHARED_DATA, TASKS["stsb"], "train")
    i = s.ids.index("train-1523")  # written as "A dog in a ""superman"" shirt sleeps on a blanket."
    assert s.texts[i][0] == 'A dog in a "superman" shirt sleeps on a blanket.' and s.labels[i] == 4.0
