"""Evaluation: retrieval recall@K, zero-shot classification, linear probes, per language; reports."""

from .hubness import HubnessBank, choose_hubness
from .probe import linear_probe
from .retrieval import EmbeddedPairs, embed_pairs, evaluate_retrieval, recall_at_k, retrieval_by_lang
from .zeroshot import class_embeddings, emoji_zeroshot, evaluate_zeroshot, load_templates

__all__ = ["EmbeddedPairs", "HubnessBank", "choose_hubness", "class_embeddings", "embed_pairs",
           "emoji_zeroshot", "evaluate_retrieval", "evaluate_zeroshot", "linear_probe", "load_templates", "recall_at_k",
           "retrieval_by_lang"]
