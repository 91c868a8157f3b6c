"""Evaluation: retrieval recall@K per language (zero-shot classification and reports come with the eval issue)."""

from .retrieval import EmbeddedPairs, embed_pairs, evaluate_retrieval, recall_at_k, retrieval_by_lang

__all__ = ["EmbeddedPairs", "embed_pairs", "evaluate_retrieval", "recall_at_k", "retrieval_by_lang"]
