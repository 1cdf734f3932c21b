from __future__ import annotations

import sys

import pytest
import torch

from deployprune.data import digits, load_data
from deployprune.errors import UnsupportedError, UsageError


def test_digits_loaders_are_real_stratified_and_reproducible():
    train, val = digits(batch_size=50, seed=0)
    xt, yt = train.dataset.tensors
    xv, yv = val.dataset.tensors
    assert len(yt) + len(yv) == 1797 and len(yv) == 360
    assert xt.shape[1:] == (1, 8, 8) and xt.dtype == torch.float32 and yt.dtype == torch.int64
    assert float(xt.min()) == 0.0 and float(xt.max()) == 1.0
    assert torch.bincount(yv).min() >= 35  # stratified: every class in validation
    # same seed -> same shuffle; the loader's generator drives it
    first = [next(iter(train))[1] for _ in range(2)]
    assert not torch.equal(first[0], first[1])  # the generator advances between epochs
    train.generator.manual_seed(9)
    a = next(iter(train))[1]
    train.generator.manual_seed(9)
    assert torch.equal(a, next(iter(train))[1])


def test_missing_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(UnsupportedError, match=r"pip install 'deployprune\[data\]'"):
        load_data("digits")


def test_entry_point_gets_batch_size_and_seed(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(
        "def loaders(batch_size, seed):\n    return [('b', batch_size, seed)], None\n\n"
        "def plain():\n    return [1], [2]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_data("mydata:loaders", batch_size=7, seed=3) == ([("b", 7, 3)], None)
    assert load_data("mydata:plain") == ([1], [2])
    with pytest.raises(UsageError, match="'mydata:nope': module 'mydata' has no attribute 'nope'"):  # like --model
        load_data("mydata:nope")
    with pytest.raises(UsageError, match="expected 'digits' or an entry point"):
        load_data("mydata:")
