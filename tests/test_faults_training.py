"""Faults around training and saved SAEs (issue 15): checkpoints that know their data, silent modelling
mistakes, damaged SAE files, foreign folders, empty batches. Each case is one parametrized id."""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

from adaptivek.probe import RidgeProbe
from adaptivek.sae import AdaptiveKSAE, BatchTopKSAE, TopKSAE, load_sae
from adaptivek.training import TrainConfig, TrainingWarning, content_hash, train_sae

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=600, d=16, seed=0):
    """Vectors and a complexity label in [0, 10] that is linear in them."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    return X, (5 + 1.5 * X[:, 0]).clamp(0, 10)


def _cfg(**kw):
    base = dict(steps=12, batch_size=128, warmup_steps=2, dead_after_vectors=256, phase_ratio=0.5, probe_folds=3,
                checkpoint_every=4)
    return TrainConfig(**(base | kw))


def _ada(seed=0):
    return AdaptiveKSAE(16, 64, k_min=2, k_max=20, seed=seed)


class _Stop(Exception):
    pass


def _stop_at(n):
    def callback(step, row):
        if step == n:
            raise _Stop
    return callback


def _checkpoint(tmp_path, finished, X, y):
    """A checkpoint of the run (_ada(), X, y, _cfg()): finished, or interrupted after step 10 (saved at 8)."""
    try:
        train_sae(_ada(), X, y, _cfg(), progress=False, checkpoint_dir=tmp_path,
                  callback=None if finished else _stop_at(10))
    except _Stop:
        pass
    return tmp_path / "checkpoint.pt"


def _training_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, TrainingWarning)]


# ----------------------------------------------------------------------------- checkpoints know their run
_OTHER_X = _data(seed=1)[0]
_PERM = torch.randperm(600, generator=torch.Generator().manual_seed(2))
_CHANGES = {  # id: (what the second call changes, words the error must use)
    "X-same-shape": (lambda X, y: dict(X=_OTHER_X), "the contents of X"),
    "X-one-value": (lambda X, y: dict(X=X.index_put((torch.tensor([5]), torch.tensor([3])), torch.tensor(9.0))),
                    "the contents of X"),
    "rows-permuted": (lambda X, y: dict(X=X[_PERM], y=y[_PERM]), "the contents of X; the labels y"),
    "X-float64": (lambda X, y: dict(X=X.double()), "the contents of X"),
    "fewer-rows": (lambda X, y: dict(X=X[:500], y=y[:500]), "the number of training vectors (600 there, 500 now)"),
    "y": (lambda X, y: dict(y=y.flip(0)), "the labels y"),
    "k": (lambda X, y: dict(k=torch.arange(600) % 3 + 2), "the per-row k"),
    "init": (lambda X, y: dict(sae=_ada(seed=5)), "the SAE's initial weights (built with another seed, or seed=None)"),
    "lr": (lambda X, y: dict(cfg=_cfg(lr=5e-3)), r"TrainConfig.lr (None there, 0.005 now)"),
    "sae-config": (lambda X, y: dict(sae=AdaptiveKSAE(16, 64, k_min=2, k_max=24, seed=0)), "the SAE's config"),
}


@pytest.mark.parametrize("finished", [False, True], ids=["interrupted", "finished"])
@pytest.mark.parametrize("change", list(_CHANGES))
def test_a_checkpoint_of_another_run_is_refused(tmp_path, change, finished):
    X, y = _data()
    ckpt = _checkpoint(tmp_path, finished, X, y)
    before = ckpt.read_bytes()
    make, words = _CHANGES[change]
    call = dict(sae=_ada(), X=X, y=y, cfg=_cfg(), k=None) | make(X, y)
    with pytest.raises(ValueError, match=re.escape(f"{ckpt} was written by another run: it differs in {words}.")):
        train_sae(call["sae"], call["X"], call["y"], call["cfg"], k=call["k"], progress=False,
                  checkpoint_dir=tmp_path)
    assert ckpt.read_bytes() == before  # refused, not overwritten


def test_a_finished_checkpoint_of_the_same_run_is_returned_with_a_warning(tmp_path):
    X, y = _data()
    ref, ref_hist = train_sae(_ada(), X, y, _cfg(), progress=False, checkpoint_dir=tmp_path)
    steps = []
    with pytest.warns(TrainingWarning, match=r"holds this very run, finished \(12 steps.*returned without training"):
        back, hist = train_sae(_ada(), X, y, _cfg(), progress=False, checkpoint_dir=tmp_path,
                               callback=lambda s, row: steps.append(s))
    assert steps == [] and not back.training
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ref.state_dict().items())
    assert torch.equal(back.probe.weight, ref.probe.weight) and len(hist) == len(ref_hist)


def test_an_old_format_checkpoint_is_refused_by_its_version(tmp_path):
    X, y = _data()
    ckpt = _checkpoint(tmp_path, False, X, y)
    state = torch.load(ckpt, weights_only=True)
    state["fingerprint"]["version"] = 2
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match=r"differs in its format \(version 2; this adaptivek writes 4\)"):
        train_sae(_ada(), X, y, _cfg(), progress=False, checkpoint_dir=tmp_path)


def _damage_contents(ckpt):
    state = torch.load(ckpt, weights_only=True)
    state["sae"]["W_dec"] = torch.zeros(3, 3)
    torch.save(state, ckpt)


_BREAK = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "is not a readable"),
    "garbage": (lambda p: p.write_bytes(b"\x00garbage" * 10), "is not a readable"),
    "empty": (lambda p: p.write_bytes(b""), "is not a readable"),
    "not-a-checkpoint": (lambda p: torch.save({"weights": torch.zeros(3)}, p), "is not a checkpoint written by"),
    "pickled-object": (lambda p: torch.save({"fingerprint": Path("x")}, p), "is not a readable"),
    "damaged-contents": (_damage_contents, "matches this run but its contents are damaged"),
}


@pytest.mark.parametrize("fault", list(_BREAK))
def test_an_unreadable_checkpoint_is_a_one_line_error_naming_the_file(tmp_path, fault):
    X, y = _data()
    ckpt = _checkpoint(tmp_path, False, X, y)
    damage, words = _BREAK[fault]
    damage(ckpt)
    with pytest.raises(ValueError, match=re.escape(f"{ckpt} {words}")) as info:
        train_sae(_ada(), X, y, _cfg(), progress=False, checkpoint_dir=tmp_path)
    assert "\n" not in str(info.value) and "delete it" in str(info.value)


@pytest.mark.parametrize("other", ["one-ulp", "rows-swapped", "dtype", "shape"])
def test_content_hash_sees_every_change(other):
    X = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    changed = {"one-ulp": lambda: X.index_put((torch.tensor([299]), torch.tensor([7])),
                                              torch.nextafter(X[299, 7], torch.tensor(math.inf))),
               "rows-swapped": lambda: X[torch.tensor([1, 0] + list(range(2, 300)))],
               "dtype": lambda: X.view(torch.int32),  # the same bytes, read as another dtype
               "shape": lambda: X.reshape(600, 4)}[other]()  # the same bytes, another shape
    assert content_hash(X.clone()) == content_hash(X)
    assert content_hash(changed) != content_hash(X)


# ----------------------------------------------------------------------------- silent modelling mistakes
@pytest.mark.parametrize("kw,match", [
    (dict(lr=math.inf), r"TrainConfig.lr=inf: must be a finite number > 0"),
    (dict(lr=math.nan), r"TrainConfig.lr=nan: must be a finite number > 0"),
    (dict(probe_lr=math.inf), r"TrainConfig.probe_lr=inf"),
    (dict(epochs=math.inf), r"TrainConfig.epochs=inf"),
    (dict(k_temperature=math.nan), r"TrainConfig.k_temperature=nan"),
    (dict(l1_weight=math.inf), r"TrainConfig.l1_weight=inf: must be a finite number >= 0"),
    (dict(auxk_alpha=math.nan), r"TrainConfig.auxk_alpha=nan"),
    (dict(grad_clip=math.nan), r"TrainConfig.grad_clip=nan"),
    (dict(decay_start=math.nan), r"TrainConfig.decay_start=nan"),
    (dict(lr="1e-3"), r"TrainConfig.lr='1e-3': must be a number, not a str"),
    (dict(warmup_steps=1.5), r"TrainConfig.warmup_steps=1.5: must be an int"),
    (dict(seed=0.5), r"TrainConfig.seed=0.5: must be an int"),
    (dict(steps=True), r"TrainConfig.steps=True"),
    (dict(deviation_bounds=(0.01, math.inf)), r"TrainConfig.deviation_bounds"),
    (dict(probe_lambdas=()), r"TrainConfig.probe_lambdas"),
    (dict(probe_lambdas=(1.0, math.nan)), r"TrainConfig.probe_lambdas"),
], ids=["lr-inf", "lr-nan", "probe_lr-inf", "epochs-inf", "k_temperature-nan", "l1-inf", "auxk-nan", "grad_clip-nan",
        "decay_start-nan", "lr-str", "warmup-float", "seed-float", "steps-bool", "deviation-bounds-inf",
        "lambdas-empty", "lambdas-nan"])
def test_non_finite_or_mistyped_settings_are_refused_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_an_infinite_grad_clip_means_no_clipping():
    assert TrainConfig(grad_clip=math.inf).grad_clip == math.inf


@pytest.mark.parametrize("case", ["extreme-X", "huge-lr"])
def test_a_diverging_run_stops_naming_the_step(tmp_path, case):
    X, _ = _data()
    X = X * 1e20 if case == "extreme-X" else X
    cfg = TrainConfig(steps=20, batch_size=64, lr=1e30 if case == "huge-lr" else 1e-3, checkpoint_every=1,
                      dead_after_vectors=256)
    with pytest.raises(FloatingPointError, match=r"training diverged at step \d+: .*lr=.*largest \|x\|") as info:
        train_sae(TopKSAE(16, 64, 4, seed=0), X, cfg=cfg, progress=False, checkpoint_dir=tmp_path)
    if case == "extreme-X":
        assert "at step 1:" in str(info.value)
    ckpt = tmp_path / "checkpoint.pt"
    if ckpt.exists():  # whatever was saved before the stop holds finite weights only
        state = torch.load(ckpt, weights_only=True)
        assert all(bool(torch.isfinite(v).all()) for v in state["sae"].values())


@pytest.mark.parametrize("labels,c_max,outcome", [
    ("0-100", 10.0, "error"),
    ("three-above", 10.0, "outside"),
    ("0-1", 10.0, "narrow"),
    ("0-100", 100.0, "none"),
    ("0-10", 10.0, "none"),
], ids=["0-100-labels", "3-of-600-outside", "0-1-labels", "0-100-on-a-0-100-scale", "in-scale"])
def test_labels_on_another_scale_than_the_sae(labels, c_max, outcome):
    X, y = _data()
    y = {"0-100": y * 10, "three-above": y.index_fill(0, torch.tensor([0, 1, 2]), 11.0), "0-1": y / 10,
         "0-10": y}[labels]
    sae = AdaptiveKSAE(16, 64, k_min=2, k_max=20, c_max=c_max, seed=0)
    if outcome == "error":
        with pytest.raises(ValueError, match=r"labels lie outside the complexity scale \[c_min=0, c_max=10\].*"
                                             r"rescale y to \[0, 10\]"):
            train_sae(sae, X, y, _cfg(), progress=False)
        return
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train_sae(sae, X, y, _cfg(), progress=False)
    found = _training_warnings(record)
    want = {"outside": r"^3 of 600 labels lie outside", "narrow": r"labels cover at most a tenth .* k only spans"}
    if outcome == "none":
        assert found == []
    else:
        assert len(found) == 1 and re.search(want[outcome], found[0]), found


_SCHEDULES = {  # id: (sae, n, cfg, the warning, or None for none at all)
    "few-steps": (lambda: TopKSAE(16, 64, 4, seed=0), 100, TrainConfig(),
                  r"training makes only 1 step\(s\): 100 vectors x 15 epochs / batch_size 2048; pass steps="),
    "auxk-idle": (lambda: TopKSAE(16, 64, 4, seed=0), 600, TrainConfig(steps=60, batch_size=64),
                  r"AuxK never runs: .*dead_after_vectors=10000 .* training sees 3840; lower dead_after_vectors="),
    "phase-3-short": (_ada, 800, TrainConfig(batch_size=128, probe_folds=3),
                      r"phase 3 runs 10 step\(s\), fewer than its warmup_steps=15"),
    "phase-2-empty": (_ada, 600, TrainConfig(steps=1, probe_folds=3, dead_after_vectors=1),
                      r"phase 2 \(the SAE with the probe frozen\) never runs"),
    "explicit-few-steps": (lambda: TopKSAE(16, 64, 4, seed=0), 600, _cfg(steps=5), None),
    "sane": (_ada, 600, _cfg(), None),
}


@pytest.mark.parametrize("case", list(_SCHEDULES))
def test_a_schedule_that_hardly_trains_is_warned_about(case):
    make, n, cfg, want = _SCHEDULES[case]
    X, y = _data(n=n)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        train_sae(make(), X, y, cfg, progress=False)
    found = _training_warnings(record)
    if want is None:
        assert found == []
    else:
        assert any(re.search(want, w) for w in found), found


# ----------------------------------------------------------------------------- empty batches
def _sae(kind):
    X, y = _data(n=200)
    if kind == "adaptivek":
        return AdaptiveKSAE(16, 64, RidgeProbe.fit(X, y, folds=3), k_min=2, k_max=20, seed=0).eval()
    if kind == "batchtopk-frozen":
        sae = BatchTopKSAE(16, 64, 4, seed=0).train()
        with torch.no_grad():
            sae(X)
        return sae.freeze(X)
    return {"topk": TopKSAE, "batchtopk": BatchTopKSAE}[kind](16, 64, 4, seed=0).eval()


@pytest.mark.parametrize("op,shape", [("encode", (0, 64)), ("encode_sparse", (0, 64)), ("pre_acts", (0, 64)),
                                      ("decode", (0, 16)), ("decode_sparse", (0, 16))])
@pytest.mark.parametrize("kind", ["topk", "adaptivek", "batchtopk", "batchtopk-frozen"])
def test_an_empty_batch_encodes_and_decodes_to_empty_results(kind, op, shape):
    sae, x = _sae(kind), torch.zeros(0, 16)
    with torch.no_grad():
        out = {"encode": lambda: sae.encode(x), "encode_sparse": lambda: sae.encode_sparse(x).to_dense(64),
               "pre_acts": lambda: sae.pre_acts(x), "decode": lambda: sae.decode(torch.zeros(0, 64)),
               "decode_sparse": lambda: sae.decode_sparse(sae.encode_sparse(x))}[op]()
    assert tuple(out.shape) == shape


@pytest.mark.parametrize("call,match", [
    (lambda: _sae("topk")(torch.zeros(0, 16)), "x has no rows: forward's training losses need one"),
    (lambda: _sae("adaptivek")(torch.zeros(0, 16)), "x has no rows"),
    (lambda: _sae("topk").init_b_dec(torch.zeros(0, 16)), "init_b_dec needs at least one row"),
    (lambda: _sae("batchtopk-frozen").freeze(torch.zeros(0, 16)), r"freeze\(X\) needs rows of X"),
    (lambda: train_sae(TopKSAE(16, 64, 4), torch.zeros(0, 16), progress=False), "X is empty"),
], ids=["forward-topk", "forward-adaptivek", "init_b_dec", "freeze", "train"])
def test_what_needs_rows_refuses_an_empty_batch(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- damaged SAE files
def _saved(tmp_path, kind="topk"):
    sae = _sae(kind)
    sae.save(tmp_path / "m")
    return tmp_path / "m"


def _format1(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "old"
    path.mkdir()
    save_file({k: v.contiguous() for k, v in _sae("topk").state_dict().items()}, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"format_version": 1, "class": "TopKSAE", "dtype": "float32",
                                               "d_in": 16, "d_sae": 64, "k": 4}))
    return path


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _edit_json(p, change):
    cfg = json.loads(p.read_text())
    change(cfg)
    p.write_text(json.dumps(cfg))


def _edit_weights(p, change):
    from safetensors.torch import load_file, save_file

    w = load_file(str(p))
    change(w)
    save_file(w, str(p))


_SAE_FAULTS = {  # id: (make the folder, file to damage, damage, words)
    "weights-truncated": (_saved, "adaptivek_sae.safetensors", _truncate, "is not a readable safetensors file"),
    "weights-empty": (_saved, "adaptivek_sae.safetensors", lambda p: p.write_bytes(b""), "is not a readable"),
    "cfg-truncated": (_saved, "adaptivek_cfg.json", _truncate, "is not valid JSON"),
    "cfg-not-an-object": (_saved, "adaptivek_cfg.json", lambda p: p.write_text("[1, 2]"), "holds a JSON list"),
    "cfg-field-missing": (_saved, "adaptivek_cfg.json", lambda p: _edit_json(p, lambda c: c.pop("d_in")),
                          "lacks ['d_in']"),
    "cfg-invalid-value": (_saved, "adaptivek_cfg.json", lambda p: _edit_json(p, lambda c: c.update(k=999)),
                          "holds an invalid config: k (999) > d_sae (64)"),
    "weights-missing-tensor": (_saved, "adaptivek_sae.safetensors", lambda p: _edit_weights(p, lambda w: w.pop("W_dec")),
                               "does not match its config (missing W_dec)"),
    "weights-wrong-shape": (_saved, "adaptivek_sae.safetensors",
                            lambda p: _edit_weights(p, lambda w: w.update(W_dec=w["W_dec"][:10].contiguous())),
                            "does not match its config (W_dec is (10, 16), expected (64, 16))"),
    "probe-entry-missing": (lambda t: _saved(t, "adaptivek"), "adaptivek_sae.safetensors",
                            lambda p: _edit_weights(p, lambda w: w.pop("probe.x_mean")), "holds damaged entries"),
    "format-1-cfg-truncated": (_format1, "cfg.json", _truncate, "is not valid JSON"),
    "format-1-weights-truncated": (_format1, "sae.safetensors", _truncate, "is not a readable safetensors file"),
}


@pytest.mark.parametrize("fault", list(_SAE_FAULTS))
def test_a_damaged_sae_file_is_a_one_line_error_naming_it(tmp_path, fault):
    make, name, damage, words = _SAE_FAULTS[fault]
    path = make(tmp_path)
    damage(path / name)
    with pytest.raises(ValueError, match=re.escape(f"{path / name} {words}")) as info:
        load_sae(path)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- foreign folders, permissions
def _sparsify_folder(path):
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps({"expansion_factor": 32, "k": 32}))
    (path / "sae.safetensors").write_bytes(b"sparsify weights")


@pytest.mark.parametrize("foreign", ["saelens", "sparsify", "format-1"])
def test_save_beside_another_tools_files_keeps_them_and_loads_ours(tmp_path, foreign):
    path = tmp_path / "f"
    if foreign == "saelens":
        TopKSAE(16, 64, 4, seed=1).export_saelens(path)
    elif foreign == "sparsify":
        _sparsify_folder(path)
    else:
        path = _format1(tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    ours = TopKSAE(16, 64, 5, seed=2)
    ours.save(path)
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.name in before} == before
    back = load_sae(path)
    assert back.k == 5 and torch.equal(back.W_dec, ours.W_dec)


@pytest.mark.parametrize("foreign", ["sparsify", "format-1", "not-json"])
def test_export_saelens_refuses_to_overwrite_files_it_did_not_write(tmp_path, foreign):
    path = tmp_path / "f"
    if foreign == "sparsify":
        _sparsify_folder(path)
    elif foreign == "format-1":
        path = _format1(tmp_path)
    else:
        path.mkdir()
        (path / "cfg.json").write_text("{not json")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(FileExistsError, match=re.escape(f"{path} already holds a cfg.json")):
        TopKSAE(16, 64, 5, seed=2).export_saelens(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_export_saelens_may_replace_its_own_export(tmp_path):
    TopKSAE(16, 64, 4, seed=1).export_saelens(tmp_path / "sl")
    TopKSAE(16, 64, 6, seed=1).export_saelens(tmp_path / "sl")
    assert json.loads((tmp_path / "sl" / "cfg.json").read_text())["k"] == 6


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
@pytest.mark.parametrize("how", ["save", "export_saelens"])
def test_saved_weights_get_the_permissions_of_the_json_beside_them(tmp_path, umask, how):
    old = os.umask(umask)
    try:
        getattr(TopKSAE(16, 64, 4, seed=0), how)(tmp_path / "m")
    finally:
        os.umask(old)
    modes = {p.suffix: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert modes == {".json": 0o666 & ~umask, ".safetensors": 0o666 & ~umask}


# ----------------------------------------------------------------------------- compare checks its output first
@pytest.mark.parametrize("out,error,match", [
    (lambda t: t, ValueError, "is a directory; give the path of the results JSON file"),
    (lambda t: (t / "a_file").write_text("") or t / "a_file" / "results.json", PermissionError,
     "is not a writable folder"),
], ids=["out-is-a-folder", "out-under-a-file"])
def test_compare_refuses_a_bad_output_path_before_training(tmp_path, monkeypatch, out, error, match):
    from adaptivek import comparison, lineup

    def no_training(*a, **k):
        raise AssertionError("compare trained before checking its output path")

    monkeypatch.setattr(lineup, "train_topk_sweep", no_training)
    X, y = _data(n=200)
    with pytest.raises(error, match=match):
        comparison.compare(X[:150], y[:150], X[150:], y[150:], out=out(tmp_path), log=None)
