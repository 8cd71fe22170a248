"""adaptivek.report, per-token complexity part (chapter 2): label profiles along the position and spreads."""

from __future__ import annotations

import math

import pytest
import torch

from adaptivek import report

NAN = float("nan")


def test_label_by_position_skips_unlabelled_tokens():
    # two texts: positions 0-3 and 0-2, the first token of each unlabelled
    label = torch.tensor([NAN, 1.0, 2.0, 3.0, NAN, 3.0, 4.0])
    position = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    prof = report.label_by_position(label, position)
    assert prof.index.tolist() == [1, 2, 3]  # position 0 has no labelled token
    assert prof["mean"].tolist() == [2.0, 3.0, 3.0]
    assert prof["n"].tolist() == [2, 2, 1]
    assert prof.loc[1, "q25"] == pytest.approx(1.5) and prof.loc[1, "q75"] == pytest.approx(2.5)


def test_label_spread_separates_within_and_between_texts():
    # text 0 labels 1, 3 (mean 2, var 1); text 1 labels 5, 7 (mean 6, var 1); text 2 one token (no variance)
    label = torch.tensor([NAN, 1.0, 3.0, 5.0, 7.0, 4.0])
    text_index = torch.tensor([0, 0, 0, 1, 1, 2])
    spread = report.label_spread(label, text_index)
    assert spread["within"] == pytest.approx(1.0)
    assert spread["between"] == pytest.approx(math.sqrt(((2 - 4) ** 2 + (6 - 4) ** 2 + 0) / 3))
    assert spread["texts"] == 3


def test_label_spread_is_zero_within_constant_texts():
    label = torch.tensor([2.0, 2.0, 2.0, 8.0, 8.0])
    spread = report.label_spread(label, torch.tensor([0, 0, 0, 1, 1]))
    assert spread["within"] == 0.0 and spread["between"] == pytest.approx(3.0)
