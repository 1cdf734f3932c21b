"""The summary's MACs ratio reads as what happened (issue 13: ``1.00× fewer`` for an unchanged count)."""

from __future__ import annotations

import pytest

from deployprune.report import _fewer


@pytest.mark.parametrize(("before", "after", "text"), [
    (282_000, 162_000, "1.74× fewer"),
    (1_810_000_000, 1_810_000_000, "unchanged"),
    (1_810_000_000, 1_808_000_000, "about the same"),
    (100, 120, "1.20× more"),
])
def test_macs_ratio_wording(before: int, after: int, text: str) -> None:
    assert _fewer(before, after) == text
