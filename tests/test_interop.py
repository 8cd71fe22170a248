"""Interop with SAELens and EleutherAI sparsify, checked against the real libraries.

Round trips: our export loaded by the peer's own loader, and the peer's SAE (built with its classes, saved with
its save function) imported here, give the same active latents and the same codes and reconstructions. The
tests that need a library skip with a message when the ``interop`` extra is absent; the rest (our files,
bad inputs) always run. SAELens takes seconds to import: the fixtures import each library once per module.
"""

from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import _close
from safetensors.torch import load_file, save_file

from adaptivek import AdaptiveKSAE, BatchTopKSAE, RidgeProbe, TopKSAE, interop, load_sae
from adaptivek.interop import export_saelens, export_sparsify, from_saelens, from_sparsify

D_IN, D_SAE, K = 16, 64, 4
_SKIP = "the interop extra is not installed (pip install 'adaptivek[interop]')"


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens", reason=_SKIP)


@pytest.fixture(scope="module")
def sparsify():
    return pytest.importorskip("sparsify", reason=_SKIP)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _x(n=48, seed=5):
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def _randomise(module, seed=0, scale=0.3, names=None):
    """Perturb the parameters (all, or ``names``) so that nothing is at its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if names is None or name in names:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _topk(seed=0):
    return _randomise(TopKSAE(D_IN, D_SAE, K, seed=seed), seed, names=("W_enc", "b_enc", "b_dec"))


def _adaptivek():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, D_IN, generator=g)
    probe = RidgeProbe.fit(X, (X[:, :3].sum(1) * 1.5 + 5).clamp(0, 10), folds=3)
    return _randomise(AdaptiveKSAE(D_IN, D_SAE, probe, k_min=2, k_max=30, steepness=4.0, seed=0), 0,
                      names=("W_enc", "b_enc", "b_dec"))


def _same_codes(a, b, rtol=1e-5, atol=1e-5):
    """Dense codes [B, d_sae]: the same active latents in every row, and close values."""
    a, b = a.detach(), b.detach()
    assert torch.equal(a != 0, b != 0), f"{int((a != 0).ne(b != 0).sum())} latents differ in activity"
    _close(a, b, rtol=rtol, atol=atol)


def _matches(peer_encode, peer_decode, ours, x):
    """``ours`` gives the peer's codes and reconstructions on ``x``; returns the largest differences."""
    with torch.no_grad():
        codes, mine = peer_encode(x), ours.encode(x)
        _same_codes(codes, mine)
        recon, my_recon = peer_decode(codes), ours.decode(mine)
    _close(recon, my_recon, rtol=1e-5, atol=1e-5)
    return float((codes - mine).abs().max()), float((recon - my_recon).abs().max())


# ----------------------------------------------------------------------------- our exports in SAELens
def test_topk_export_loads_in_saelens_with_its_metadata(tmp_path, sae_lens):
    ours = _topk()
    ours.export_saelens(tmp_path / "sl", model_name="smollm2-135m", hook_name="blocks.15.hook_resid_post",
                        metadata={"context_size": 128})
    peer = sae_lens.SAE.load_from_disk(tmp_path / "sl")
    assert type(peer) is sae_lens.TopKSAE and peer.cfg.k == K
    meta = peer.cfg.metadata
    assert (meta.model_name, meta.hook_name, meta.context_size) == ("smollm2-135m", "blocks.15.hook_resid_post", 128)
    _matches(peer.encode, peer.decode, ours, _x())


def test_adaptivek_loads_in_saelens_as_a_working_adaptivek(tmp_path, sae_lens):
    ours = _adaptivek()
    ours.export_saelens(tmp_path / "ak", hook_name="blocks.15.hook_resid_post")
    cls = interop.register_saelens()
    assert interop.register_saelens() is cls is interop.AdaptiveKSAELens  # once; later calls change nothing
    peer = sae_lens.SAE.load_from_disk(tmp_path / "ak")
    assert type(peer) is cls and peer.cfg.metadata.hook_name == "blocks.15.hook_resid_post"
    x = _x()
    k = ours.encode_sparse(x).k
    assert torch.equal(peer.k_for(x), k) and len(set(k.tolist())) > 3  # per-row k, from the saved probe
    _matches(peer.encode, peer.decode, ours, x)
    with torch.no_grad():  # [batch, seq, d_in] as SAELens' hooks pass it
        _close(peer(x.reshape(4, 12, D_IN)).reshape(-1, D_IN), peer(x))
    peer.save_model(tmp_path / "again")  # SAELens' own save keeps the probe
    back = from_saelens(tmp_path / "again")
    assert type(back) is AdaptiveKSAE and back.cfg == ours.cfg
    assert torch.equal(back.encode(x), ours.encode(x)) and torch.equal(back.probe.predict(x), ours.probe.predict(x))


def _frozen_batchtopk():
    sae = _randomise(BatchTopKSAE(D_IN, D_SAE, K, seed=0), 2, scale=0.1, names=("b_enc",)).train()
    with torch.no_grad():
        sae(_x(64, seed=9))
    return sae.freeze(_x(64, seed=9))


def _jumprelu():
    from adaptivek.sae import JumpReLUSAE

    sae = _randomise(JumpReLUSAE(D_IN, D_SAE, init_threshold=0.3, seed=0), 3, scale=0.2, names=("b_enc",))
    sae.init_thresholds(_x(64, seed=9), l0=8)  # one threshold per latent
    assert float(sae.threshold.std()) > 0.01
    return sae


@pytest.mark.parametrize("make", [_frozen_batchtopk, _jumprelu], ids=["frozen-batchtopk", "jumprelu"])
def test_threshold_saes_load_in_saelens_as_jumprelu(tmp_path, sae_lens, make):
    ours = make().eval()
    export_saelens(ours, tmp_path / "j")
    peer = sae_lens.SAE.load_from_disk(tmp_path / "j")
    assert type(peer) is sae_lens.JumpReLUSAE
    _matches(peer.encode, peer.decode, ours, _x())
    back = from_saelens(tmp_path / "j")
    assert type(back) is type(ours) and back.cfg == ours.cfg and torch.equal(back.encode(_x()), ours.encode(_x()))


# ----------------------------------------------------------------------------- SAELens' SAEs here
def _sl_topk(sl, path, **cfg):
    _randomise(sl.TopKSAE(sl.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, **cfg))).save_model(path)


def _sl_checkpoint(sl, path):  # a training checkpoint: decoder rows of any norm, rescaled at run time
    sae = _randomise(sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)), scale=1.0)
    assert sae.cfg.rescale_acts_by_decoder_norm
    sae.save_model(path)


def _sl_inference(sl, path):
    sae = _randomise(sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K)), scale=1.0)
    sae.save_inference_model(path)


def _sl_jumprelu(sl, path):
    sae = _randomise(sl.JumpReLUSAE(sl.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE)))
    with torch.no_grad():
        sae.threshold.abs_()
    sae.save_model(path)


def _sl_pre6(sl, path):  # SAELens 5.x: no architecture, the activation names it; no sae_lens_version
    _sl_topk(sl, path)
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": True, "hook_point": "blocks.0.hook_resid_pre",
           "model_name": "gpt2", "normalize_activations": False}
    (path / "cfg.json").write_text(json.dumps(cfg))


_PEERS = {"topk": _sl_topk, "training-checkpoint": _sl_checkpoint, "save_inference_model": _sl_inference,
          "b_dec-not-on-input": lambda sl, p: _sl_topk(sl, p, apply_b_dec_to_input=False),
          "jumprelu": _sl_jumprelu, "pre-6.0-config": _sl_pre6}


@pytest.mark.parametrize("peer", list(_PEERS))
def test_from_saelens_gives_saelens_codes(tmp_path, sae_lens, peer):
    _PEERS[peer](sae_lens, tmp_path / "p")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "p")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "decoder rows are not unit norm")  # random peers: any norms
        ours = from_saelens(tmp_path / "p")
    _matches(theirs.encode, theirs.decode, ours, _x())


def test_a_training_checkpoint_read_naively_gives_other_codes(tmp_path, sae_lens):
    """Why the fold matters: the raw weights of a checkpoint with rescale_acts_by_decoder_norm differ."""
    _sl_checkpoint(sae_lens, tmp_path / "c")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "c")
    naive = TopKSAE(D_IN, D_SAE, K)
    naive.load_state_dict(load_file(str(tmp_path / "c" / "sae_weights.safetensors")))
    with torch.no_grad():
        assert not torch.equal(theirs.encode(_x()) != 0, naive.encode(_x()) != 0)
    assert from_saelens(tmp_path / "c").W_dec.norm(dim=1).sub(1).abs().max() < 1e-5  # folded: unit rows


# ----------------------------------------------------------------------------- sparsify
def test_topk_export_loads_in_sparsify(tmp_path, sparsify):
    ours = _topk()
    export_sparsify(ours, tmp_path / "layers.3")
    peer = sparsify.SparseCoder.load_from_disk(tmp_path / "layers.3")
    assert (peer.num_latents, peer.cfg.k, peer.d_in) == (D_SAE, K, D_IN)
    assert set(sparsify.SparseCoder.load_many(str(tmp_path), local=True)) == {"layers.3"}
    _matches(lambda x: _sparsify_codes(peer, x), lambda c: _sparsify_decode(peer, c), ours, _x())


def _sparsify_codes(peer, x):
    out = peer.encode(x)
    return torch.zeros(len(x), peer.num_latents).scatter_(1, out.top_indices, out.top_acts)


def _sparsify_decode(peer, codes):
    acts, idx = codes.topk(peer.cfg.k)
    return peer.decode(acts, idx)


@pytest.mark.parametrize("normalize_decoder", [True, False], ids=["unit-decoder", "free-decoder"])
def test_from_sparsify_gives_sparsify_codes(tmp_path, sparsify, normalize_decoder):
    cfg = sparsify.SparseCoderConfig(num_latents=D_SAE, k=K, normalize_decoder=normalize_decoder)
    peer = _randomise(sparsify.SparseCoder(D_IN, cfg), names=("encoder.weight", "encoder.bias", "b_dec"))
    if not normalize_decoder:
        with torch.no_grad():
            peer.W_dec.mul_(torch.rand(D_SAE, 1, generator=torch.Generator().manual_seed(0)) + 0.5)
    peer.save_to_disk(tmp_path / "sp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = from_sparsify(tmp_path / "sp")
    assert any("not unit norm" in str(w.message) for w in caught) == (not normalize_decoder)
    _matches(lambda x: _sparsify_codes(peer, x), lambda c: _sparsify_decode(peer, c), ours, _x())


# ----------------------------------------------------------------------------- our own round trips (no library)
@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_export_then_import_is_exact(tmp_path, fmt):
    ours = _topk()
    (export_saelens if fmt == "saelens" else export_sparsify)(ours, tmp_path / "e")
    back = (from_saelens if fmt == "saelens" else from_sparsify)(tmp_path / "e")
    assert type(back) is TopKSAE and back.cfg == ours.cfg and not back.training
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(ours, name)), name


def test_importing_adaptivek_interop_imports_neither_library():
    tree = ast.parse(Path(interop.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names} | \
        {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in names if m.split(".")[0] in ("sae_lens", "sparsify")}


def test_adaptivek_export_in_half_precision_warns_about_the_probe(tmp_path):
    with pytest.warns(UserWarning, match="casts every saved tensor to the SAE's dtype, the probe too"):
        _adaptivek().to(torch.bfloat16).export_saelens(tmp_path / "h")


# ----------------------------------------------------------------------------- bad inputs
def _edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        cfg.pop(key) if value is None else cfg.__setitem__(key, value)
    path.write_text(json.dumps(cfg))


def _edit_weights(path, **changes):
    t = load_file(str(path))
    for key, value in changes.items():
        t.pop(key) if value is None else t.__setitem__(key, value)
    save_file(t, str(path))


def _saelens_case(tmp_path, cfg=None, weights=None, sae=_topk):
    path = tmp_path / "sl"
    export_saelens(sae(), path)
    _edit_json(path / "cfg.json", **(cfg or {}))
    _edit_weights(path / "sae_weights.safetensors", **(weights or {}))
    return path


_SAELENS_BAD = {
    "standard": (dict(cfg={"architecture": "standard"}), r"holds a SAELens 'standard' SAE; from_saelens imports "
                                                         r"\['topk', 'adaptivek', 'jumprelu'\]"),
    "gated": (dict(cfg={"architecture": "gated"}), "'gated' SAE; from_saelens imports"),
    "batchtopk-checkpoint": (dict(cfg={"architecture": "batchtopk"}), r"save_inference_model\(path\)"),
    "scaled-inputs": (dict(cfg={"normalize_activations": "expected_average_only_in"}),
                      "fold_activation_norm_scaling_factor"),
    "layer-norm": (dict(cfg={"normalize_activations": "layer_norm"}), "depend on each input and cannot be imported"),
    "W_enc-shape": (dict(weights={"W_enc": torch.zeros(D_IN, 32)}),
                    r"does not match cfg.json \(W_enc is \(16, 32\), expected \(16, 64\)\)"),
    "missing-b_enc": (dict(weights={"b_enc": None}), r"does not match cfg.json \(missing b_enc\)"),
    "extra-tensor": (dict(weights={"W_skip": torch.zeros(D_IN, D_IN)}), "unexpected W_skip"),
    "scaling-factor": (dict(weights={"scaling_factor": torch.full((D_SAE,), 2.0)}), "scaling_factor that is not all"),
    "k-too-large": (dict(cfg={"k": 500}), r"cannot build: .*k \(500\) > d_sae \(64\)"),
    "no-k": (dict(cfg={"k": None}), "TopK SAE without an integer k"),
    "no-d_in": (dict(cfg={"d_in": None}), r"lacks integer \['d_in'\]"),
    "probe-missing": (dict(weights={"probe.weight": None}, sae=_adaptivek), "damaged probe"),
    "jumprelu-threshold": (dict(cfg={"architecture": "jumprelu", "metadata": {"sae_lens_version": "6.54.12"}},
                                weights={"threshold": -torch.ones(D_SAE)}), r"64 threshold\(s\) <= 0"),
}


@pytest.mark.parametrize("case", list(_SAELENS_BAD))
def test_a_saelens_folder_adaptivek_cannot_import_is_a_clear_error(tmp_path, case):
    edits, message = _SAELENS_BAD[case]
    path = _saelens_case(tmp_path, **edits)
    with pytest.raises(ValueError, match=message) as info:
        from_saelens(path)
    assert "\n" not in str(info.value)


def _sparsify_case(tmp_path, **cfg):
    path = tmp_path / "sp"
    export_sparsify(_topk(), path)
    _edit_json(path / "cfg.json", **cfg)
    return path


_SPARSIFY_BAD = {
    "transcoder": ({"transcode": True}, "describes a transcoder"),
    "skip-connection": ({"skip_connection": True}, "describes a skip connection"),
    "groupmax": ({"activation": "groupmax"}, "has activation 'groupmax': from_sparsify imports 'topk' only"),
    "no-d_in": ({"d_in": None}, "lacks an integer d_in"),
    "num_latents": ({"num_latents": 32}, r"encoder.weight is \(64, 16\), expected \(32, 16\)"),
}


@pytest.mark.parametrize("case", list(_SPARSIFY_BAD))
def test_a_sparsify_folder_adaptivek_cannot_import_is_a_clear_error(tmp_path, case):
    cfg, message = _SPARSIFY_BAD[case]
    with pytest.raises(ValueError, match=message):
        from_sparsify(_sparsify_case(tmp_path, **cfg))


def _format1(path):
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps({"format_version": 1, "class": "TopKSAE", "d_in": D_IN}))
    (path / "sae.safetensors").write_bytes(b"")
    return path


_WRONG_FOLDER = {  # reader, what the folder holds, the message
    "saelens-empty": (from_saelens, lambda p: p.mkdir() or p, r"no SAELens SAE in .*: expected cfg.json and "
                                                             r"sae_weights.safetensors$"),
    "saelens-missing": (from_saelens, lambda p: p, "; the folder does not exist"),
    "saelens-on-sparsify": (from_saelens, lambda p: export_sparsify(_topk(), p),
                            r"holds a sparsify SAE .*adaptivek.interop.from_sparsify\(path\)"),
    "saelens-on-save": (from_saelens, lambda p: _topk().save(p), r"holds an adaptivek save: .*load_sae\(path\)"),
    "sparsify-on-saelens": (from_sparsify, lambda p: export_saelens(_topk(), p),
                            r"holds a SAELens export .*adaptivek.interop.from_saelens\(path\)"),
    "sparsify-on-hookpoints": (from_sparsify, lambda p: [export_sparsify(_topk(), p / f"layers.{i}") for i in (0, 1)],
                               r"one SAE per sub-folder \(layers.0, layers.1\): pass one of them"),
    "sparsify-on-format-1": (from_sparsify, _format1, r"adaptivek save of format 1, not a sparsify SAE"),
    "load_sae-on-saelens": (load_sae, lambda p: export_saelens(_topk(), p), r"from_saelens\(path\)"),
    "load_sae-on-sparsify": (load_sae, lambda p: export_sparsify(_topk(), p), r"from_sparsify\(path\)"),
}


@pytest.mark.parametrize("case", list(_WRONG_FOLDER))
def test_a_folder_of_another_format_says_what_it_holds(tmp_path, case):
    read, make, message = _WRONG_FOLDER[case]
    make(tmp_path / "f")
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        read(tmp_path / "f")


def _unfrozen():
    return BatchTopKSAE(D_IN, D_SAE, K, seed=0)


_BAD_EXPORTS = {
    "adaptivek-without-probe": (lambda p: AdaptiveKSAE(D_IN, D_SAE, k_min=2, k_max=30).export_saelens(p),
                                ValueError, "no fitted probe, so SAELens could not choose its per-input k"),
    "unfrozen-batchtopk": (lambda p: _unfrozen().export_saelens(p), ValueError, r"not frozen.*sae.freeze\(X_train\)"),
    "adaptivek-to-sparsify": (lambda p: export_sparsify(_adaptivek(), p), ValueError, "fixed k per row"),
    "not-an-sae": (lambda p: export_sparsify(torch.nn.Linear(2, 2), p), TypeError, "must be an adaptivek SAE"),
    "sparsify-over-saelens": (lambda p: export_saelens(_topk(), p) and export_sparsify(_topk(), p), FileExistsError,
                              "already holds a cfg.json that export_sparsify did not write"),
    "saelens-over-sparsify": (lambda p: export_sparsify(_topk(), p) and export_saelens(_topk(), p), FileExistsError,
                              r"already holds a cfg.json that export_saelens did not write \(a sparsify SAE"),
    "sparsify-over-foreign": (lambda p: _format1(p) and export_sparsify(_topk(), p), FileExistsError,
                              "already holds a cfg.json and a sae.safetensors that export_sparsify did not"),
}


@pytest.mark.parametrize("case", list(_BAD_EXPORTS))
def test_an_export_that_cannot_be_written_is_a_clear_error(tmp_path, case):
    write, error, message = _BAD_EXPORTS[case]
    with pytest.raises(error, match=message):
        write(tmp_path / "e")


def test_an_export_may_replace_its_own_files_but_keeps_others(tmp_path):
    export_sparsify(_topk(0), tmp_path / "e")
    export_sparsify(_topk(1), tmp_path / "e")  # its own: replaced
    assert torch.equal(from_sparsify(tmp_path / "e").W_enc, _topk(1).W_enc)
    before = {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir()}
    with pytest.raises(FileExistsError):
        export_saelens(_topk(), tmp_path / "e")
    assert set(before) == {"cfg.json", "sae.safetensors"}
    assert {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir()} == before


def test_register_saelens_without_saelens_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "sae_lens.saes.sae", None)  # as if not installed
    with pytest.raises(ImportError, match=r"needs SAELens: pip install 'adaptivek\[interop\]'"):
        interop._saelens_classes.__wrapped__()
