"""build_sae_data: the two regimes, document-disjoint splits, exclusions counted, bad input named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adaptivek.sae_data import build_sae_data
from adaptivek.tokens import ExclusionRule


def _tokens(n_texts=12, length=10, d=8, seed=0):
    """Token rows of n_texts texts; position 0 is a sink (norm x100); text i belongs to document i // 2."""
    g = torch.Generator().manual_seed(seed)
    text_index = torch.arange(n_texts).repeat_interleave(length)
    acts = torch.randn(len(text_index), d, generator=g)
    acts[torch.arange(0, len(acts), length)] *= 100
    label = torch.linspace(1, 9, len(acts))
    label[torch.arange(len(acts)) % length < 3] = float("nan")  # the first positions are unlabelled
    return acts, text_index, np.array([f"doc{i // 2}" for i in range(n_texts)]), label


def test_all_tokens_split_by_text_and_exclude_the_sink():
    acts, ti, docs, label = _tokens()
    data = build_sae_data(acts, ti, docs, label, mode="all_tokens", train_texts=range(8), test_texts=[8, 9, 10, 11])
    assert data.counts["excluded_first_positions"] == 12 and data.counts["excluded_extreme_norm"] == 0
    assert data.counts["train_rows"] == 8 * 9 and data.counts["test_rows"] == 4 * 9
    assert data.counts["train_unlabelled"] == 8 * 2  # positions 1 and 2
    assert set(data.train.document).isdisjoint(data.test.document)
    assert bool((data.train.position > 0).all())
    X = data.scaled("train")
    assert X.pow(2).sum(1).mean().item() == pytest.approx(acts.shape[1], rel=1e-4)  # E‖x‖² = d after scaling
    assert torch.equal(data.test.acts[data.last_rows("test")], acts[torch.tensor([89, 99, 109, 119])])


def test_last_token_mode_is_one_row_per_text():
    acts, _, docs, _ = _tokens()
    last = acts[:12]
    y = torch.linspace(1, 9, 12)
    data = build_sae_data(last, None, docs, y, mode="last_token", train_texts=range(8), test_texts=range(8, 12))
    assert len(data.train) == 8 and len(data.test) == 4 and data.selection is None
    assert torch.equal(data.test.label, y[8:])
    with pytest.raises(ValueError, match="text_index=None"):
        build_sae_data(last, torch.arange(12), docs, y, mode="last_token", train_texts=range(8), test_texts=[9])


def test_another_norm_rule_excludes_and_counts_extreme_tokens():
    acts, ti, docs, label = _tokens()
    acts[5] *= 50  # an extreme token inside text 0
    data = build_sae_data(acts, ti, docs, label, mode="all_tokens", train_texts=range(8), test_texts=range(8, 12))
    assert data.counts["excluded_extreme_norm"] == 1 and data.counts["train_rows"] == 8 * 9 - 1
    loose = build_sae_data(acts, ti, docs, label, mode="all_tokens", train_texts=range(8), test_texts=range(8, 12),
                           rule=ExclusionRule(drop_first=0, max_norm_ratio=None))
    assert loose.counts["train_rows"] == 80 and loose.counts["excluded_first_positions"] == 0


@pytest.mark.parametrize("kw, match", [
    (dict(train_texts=range(8), test_texts=[7, 8]), "share a text"),
    (dict(train_texts=range(9), test_texts=[9, 10, 11]), "share 1 source document"),
    (dict(train_texts=range(8), test_texts=[]), "test_texts is empty"),
    (dict(train_texts=range(8), test_texts=[12]), r"in \[0, 12\)"),
    (dict(mode="every_token"), "mode"),
], ids=["shared-text", "shared-document", "empty-split", "unknown-text", "bad-mode"])
def test_bad_splits_and_modes_are_named(kw, match):
    acts, ti, docs, label = _tokens()
    args = dict(mode="all_tokens", train_texts=range(8), test_texts=range(8, 12)) | kw
    with pytest.raises(ValueError, match=match):
        build_sae_data(acts, ti, docs, label, **args)


def test_missing_document_ids_are_an_error():
    acts, ti, docs, label = _tokens()
    docs = docs.astype(object)
    docs[3] = None
    with pytest.raises(ValueError, match="missing id"):
        build_sae_data(acts, ti, docs, label, mode="all_tokens", train_texts=range(8), test_texts=range(8, 12))


def test_an_empty_token_set_after_exclusions_is_an_error():
    acts, ti, docs, label = _tokens(length=1)
    with pytest.raises(ValueError, match="no token left"):
        build_sae_data(acts, ti, docs, label, mode="all_tokens", train_texts=range(8), test_texts=range(8, 12))


def test_downstream_rows_point_at_each_texts_second_to_last_token():
    acts, ti, docs, label = _tokens()
    acts[118] *= 50  # text 11's second-to-last token is excluded: fall back to its last row
    data = build_sae_data(acts, ti, docs, label, mode="all_tokens", train_texts=range(8), test_texts=range(8, 12))
    texts, rows = data.downstream_rows("test")
    assert texts.tolist() == [8, 9, 10, 11]
    assert data.test.position[rows].tolist() == [8, 8, 8, 9] and data.test.text_index[rows].tolist() == [8, 9, 10, 11]


def test_prefix_labels_are_cached_verified_and_rebuilt(tmp_path, smol_tokenizer):
    from adaptivek.io import CacheWarning
    from adaptivek.sae_data import cached_prefix_labels
    from adaptivek.tokens import prefix_labels

    texts = ["The cat sat on the mat and then it slept for a long while in the sun. " * 3,
             "Quantum chromodynamics describes the strong interaction between quarks and gluons. " * 2]
    want = prefix_labels(smol_tokenizer, texts, 48, first=8, every=4)
    label, index, counts = cached_prefix_labels(tmp_path, smol_tokenizer, texts, 48, first=8, every=4)
    assert torch.equal(label.isnan(), want.label.isnan()) and torch.equal(label[~label.isnan()], want.label[~label.isnan()])
    files = sorted(tmp_path.iterdir())
    assert [f.suffix for f in files] == [".json", ".safetensors"]
    again = cached_prefix_labels(tmp_path, smol_tokenizer, texts, 48, first=8, every=4)
    assert torch.equal(again[1], index) and again[2] == counts == want.counts
    cached_prefix_labels(tmp_path, smol_tokenizer, texts, 48, first=8, every=8)  # other cut points: another entry
    assert len(list(tmp_path.iterdir())) == 4
    data = files[1].read_bytes()
    files[1].write_bytes(data[:-8] + bytes(8))  # a damaged entry is noticed and rebuilt
    with pytest.warns(CacheWarning, match="unusable"):
        rebuilt = cached_prefix_labels(tmp_path, smol_tokenizer, texts, 48, first=8, every=4)
    assert torch.equal(rebuilt[1], index) and files[1].read_bytes() == data


def test_splice_texts_reach_the_token_target_with_as_few_texts_as_possible():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 30, (40,), generator=g)
    ti = torch.repeat_interleave(torch.arange(40), lengths)
    docs = np.array([f"d{i // 2}" for i in range(40)])
    data = build_sae_data(torch.randn(len(ti), 4, generator=g), ti, docs, torch.randn(len(ti), generator=g),
                          mode="all_tokens", train_texts=range(20), test_texts=range(20, 40))
    kept = torch.bincount(data.test.text_index, minlength=40)
    picked = data.splice_texts(100, seed=3)
    assert set(picked) <= set(range(20, 40)) and len(set(picked)) == len(picked)
    scored = [int(kept[t]) - 1 for t in picked]
    assert sum(scored) >= 100 and sum(scored[:-1]) < 100  # enough, and no text more than needed
    assert picked == data.splice_texts(100, seed=3) and picked != data.splice_texts(100, seed=4)
    with pytest.raises(ValueError, match="fewer than n_tokens"):
        data.splice_texts(int(kept.sum()) + 1)
    with pytest.raises(ValueError, match="positive int"):
        data.splice_texts(0)
