"""adaptivek: AdaptiveK sparse autoencoders, reproduced and tested (Yao & Du, arXiv 2508.17320).

Names are imported lazily so that ``import adaptivek`` (and the CLI) stays fast: torch,
transformers and nnsight load only when a function that needs them is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "load_model": "models",
    "n_layers": "models",
    "d_model": "models",
    "blocks": "models",
    "model_fingerprint": "models",
    "EMBEDDED_MODELS": "models",
    "extract": "activations",
    "pearson": "stats",
    "spearman": "stats",
    "bootstrap_ci": "stats",
    "regression_metrics": "stats",
    "layer_sweep": "linear_encoding",
    "controls_table": "linear_encoding",
    "fit_and_score": "linear_encoding",
    "split_indices": "stats",
    "held_out_split": "linear_encoding",
    "context_documents": "report",
    "group_split": "stats",
    "group_kfold": "stats",
    "check_disjoint_groups": "stats",
    "score_predictions": "linear_encoding",
    "length_features": "linear_encoding",
    "mean_input_embeddings": "linear_encoding",
    "last_token_embeddings": "linear_encoding",
    "MLPProbe": "linear_encoding",
    "onestop_transfer": "linear_encoding",
    "permutation_null": "linear_encoding",
    "mean_pool": "linear_encoding",
    "rubric_features": "claim1",
    "lexical_baseline": "claim1",
    "leave_one_source_out": "claim1",
    "source_transfer": "claim1",
    "incremental_r2": "claim1",
    "shuffle_words": "claim1",
    "order_sensitivity": "claim1",
    "chunk_texts": "claim1",
    "pooled_chunk_readout": "claim1",
    "level_ordering": "claim1",
    "onestop_as_labels": "claim1",
    "claim1_verdicts": "claim1",
    "truncate_to_tokens": "activations",
    "token_positions": "tokens",
    "ExclusionRule": "tokens",
    "TokenSelection": "tokens",
    "select_tokens": "tokens",
    "prefix_cut_points": "tokens",
    "prefix_labels": "tokens",
    "PrefixLabels": "tokens",
    "TokenSet": "tokens",
    "rows_of_texts": "tokens",
    "last_token_rows": "tokens",
    "load_corpus": "corpus",
    "load_onestopenglish": "corpus",
    "RubricScorer": "complexity",
    "readability_scores": "validation",
    "level_agreement": "validation",
    "cached_llm_labels": "validation",
    "llm_agreement": "validation",
    "LLMScorer": "llm_scorer",
    "RidgeProbe": "probe",
    "complexity_to_k": "probe",
    "out_of_fold_predict": "probe",
    "TopKSAE": "sae",
    "AdaptiveKSAE": "sae",
    "load_sae": "sae",
    "BatchTopKSAE": "sae",
    "SparseCode": "sae",
    "variable_topk": "sae",
    "SAEConfig": "sae",
    "TopKConfig": "sae",
    "AdaptiveKConfig": "sae",
    "BatchTopKConfig": "sae",
    "JumpReLUSAE": "sae",
    "JumpReLUConfig": "sae",
    "L0TargetWarning": "sae",
    "export_saelens": "interop",
    "export_sparsify": "interop",
    "from_saelens": "interop",
    "from_sparsify": "interop",
    "register_saelens": "interop",
    "TrainConfig": "training",
    "train_sae": "training",
    "TrainingWarning": "training",
    "evaluate": "evaluation",
    "downstream_loss": "evaluation",
    "splice_metrics": "evaluation",
    "splice_intervals": "evaluation",
    "error_curves": "oracle",
    "ErrorCurves": "oracle",
    "oracle_allocation": "oracle",
    "OracleAllocation": "oracle",
    "allocation_fve": "oracle",
    "allocation_curves": "oracle",
    "rescale_allocation": "oracle",
    "uniform_allocation": "oracle",
    "compare": "comparison",
    "CompareConfig": "comparison",
    "SAEData": "sae_data",
    "build_sae_data": "sae_data",
    "load_sae_data": "sae_data",
    "generalisation_table": "regime",
    "pca_fve": "regime",
    "latent_health": "regime",
    "HeldOutCurve": "regime",
    "dashboard": "dashboard",
    "Dashboard": "dashboard",
    "latent_stats": "dashboard",
    "LatentStats": "dashboard",
    "choose_latents": "dashboard",
    "logit_effects": "dashboard",
    "render_dashboard": "dashboard",
    "write_dashboard": "dashboard",
    "token_strings": "dashboard",
    "unembedding": "dashboard",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adaptivek' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"adaptivek.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
