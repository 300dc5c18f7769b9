"""bidrop_ds.training.loaders: fixed subsets, one process's seeded batches, and every rank's disjoint
share of each global batch and of each held-out set (ranks stood in for by the rank number)."""

from __future__ import annotations

import datasets
import pytest

from bidrop_ds.training import loaders
from bidrop_ds.training.loaders import make_loaders, subset


def ids(rows: list[dict]) -> list[int]:
    return [row["x"] for row in rows]


def numbered(train: int, held_out: int) -> datasets.DatasetDict:
    return datasets.DatasetDict(train=datasets.Dataset.from_dict({"x": list(range(train))}),
                                test=datasets.Dataset.from_dict({"x": list(range(100, 100 + held_out))}))


def test_subset_is_fixed_and_nested() -> None:
    split = datasets.Dataset.from_dict({"x": list(range(20))})
    assert subset(split, 0) is split and subset(split, 20) is split and subset(split, 99) is split
    five, three = subset(split, 5)["x"], subset(split, 3)["x"]
    assert five == subset(split, 5)["x"] and three == five[:3]  # the same draw, whatever the size
    assert len(set(five)) == 5 and five != list(range(5))


def test_one_process_batches_are_seeded_and_held_out_sets_whole() -> None:
    encoded = numbered(10, 7)
    train, held_out = make_loaders(encoded, ids, batch_size=4, seed=3)
    first = list(train)
    assert [len(batch) for batch in first] == [4, 4, 2] and sorted(sum(first, [])) == list(range(10))
    assert list(make_loaders(encoded, ids, 4, 3)[0]) == first and list(make_loaders(encoded, ids, 4, 4)[0]) != first
    assert list(held_out) == ["test"] and list(held_out["test"]) == [list(range(100, 107))]  # batch 2 x 4


def test_each_rank_gets_a_disjoint_share_of_every_global_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = numbered(18, 7)  # 18 = 2 full global batches of 8 on 2 ranks (2 rows dropped)
    shares = {}
    for rank in (0, 1):
        monkeypatch.setattr(loaders, "world", lambda rank=rank: (rank, 2))
        train, held_out = make_loaders(encoded, ids, batch_size=8, seed=0, distributed=True)
        shares[rank] = (list(train), sum(held_out["test"], []))
    (train0, test0), (train1, test1) = shares[0], shares[1]
    assert len(train0) == len(train1) == 2 and all(len(batch) == 4 for batch in train0 + train1)
    assert not set(sum(train0, [])) & set(sum(train1, []))
    assert len(set(sum(train0 + train1, []))) == 16
    assert sorted(test0 + test1) == list(range(100, 107)) and not set(test0) & set(test1)  # each example once
    monkeypatch.setattr(loaders, "world", lambda: (0, 2))
    with pytest.raises(ValueError, match="18 train examples make no full global batch of --batch_size 32 on 2"):
        make_loaders(encoded, ids, batch_size=32, seed=0, distributed=True)
