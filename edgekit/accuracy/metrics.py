"""Accuracy metrics of a variant against its reference, on numpy arrays (no framework needed).

All functions take per-position log-probabilities over the vocabulary, shaped [positions, vocab].
"""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax over the last axis, in float64 for the reductions."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(reference_logprobs: np.ndarray, variant_logprobs: np.ndarray) -> np.ndarray:
    """KL(reference || variant) per position, in nats: sum_v p(v) * (log p(v) - log q(v))."""
    p = np.exp(reference_logprobs)
    return np.sum(p * (reference_logprobs - variant_logprobs), axis=-1)


def token_nll(logprobs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each position's actual next token."""
    return -logprobs[np.arange(len(targets)), targets]


def perplexity(nll: np.ndarray) -> float:
    """exp of the mean negative log-likelihood."""
    return float(np.exp(np.mean(nll)))


def top1_agreement(reference_top1: np.ndarray, variant_top1: np.ndarray) -> float:
    """Share of positions where both pick the same most likely token."""
    return float(np.mean(reference_top1 == variant_top1))


def percentile(values: np.ndarray, q: float) -> float:
    """The q-th percentile (0..100), linear interpolation as numpy defines it."""
    return float(np.percentile(values, q))
