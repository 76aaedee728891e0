"""Small pure functions the forward pass is built from (picoGPT style).

Every function takes and returns NumPy arrays and computes in the dtype of its input.
"""
from __future__ import annotations

import math

import numpy as np


# --- normalisation --------------------------------------------------------------------

def layer_norm_stats(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation sqrt(var + eps) over the last axis (biased variance)."""
    mu = x.mean(-1, keepdims=True)                             # [..., 1]
    sigma = np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)   # [..., 1]
    return mu, sigma


def layer_norm(x, w, b, eps):
    """LayerNorm: w * (x - mu) / sigma + b, sigma = sqrt(var + eps) (biased variance)."""
    mu, sigma = layer_norm_stats(x, eps)
    return w * ((x - mu) / sigma) + b


def rms_scale(x: np.ndarray, eps: float) -> np.ndarray:
    """s = sqrt(mean(x^2) + eps) over the last axis."""
    return np.sqrt((x * x).mean(-1, keepdims=True) + eps)      # [..., 1]


def rms_norm(x, w, b, eps):
    """RMSNorm: w * x / s (b is ignored; RMSNorm has no bias)."""
    return w * (x / rms_scale(x, eps))


NORMS = {"layernorm": layer_norm, "rmsnorm": rms_norm}


def norm_stats(kind: str, x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) such that norm(x) = w * (x - mu) / sigma + b; mu = 0 for RMSNorm."""
    if kind == "layernorm":
        return layer_norm_stats(x, eps)
    return np.zeros_like(x[..., :1]), rms_scale(x, eps)


# --- activations ----------------------------------------------------------------------

def gelu_new(x):
    """GPT-2's tanh approximation of GELU."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu(x):
    """Exact (erf) GELU."""
    from scipy.special import erf          # imported here: scipy.special costs ~0.4 s at start-up
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def relu(x):
    return np.maximum(x, 0)


def silu(x):
    """x * sigmoid(x). For x below about -709 (-88 in float32) exp(-x) overflows to inf and
    the quotient is the correct -0.0, so that overflow is not worth a warning."""
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-x))


ACTS = {"gelu_new": gelu_new, "gelu": gelu, "relu": relu, "silu": silu}


# --- softmax --------------------------------------------------------------------------

def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def logsumexp(x, axis=-1, keepdims=False):
    m = x.max(axis, keepdims=True)
    out = m + np.log(np.exp(x - m).sum(axis, keepdims=True))
    return out if keepdims else np.squeeze(out, axis)


def log_softmax(x, axis=-1):
    return x - logsumexp(x, axis, keepdims=True)


# --- positions ------------------------------------------------------------------------

def rope_cos_sin(positions: np.ndarray, d_head: int, theta: float, dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables [T, d_head] of rotary embeddings, half-split layout.

    Frequency i (i < d_head/2) is theta^(-2i/d_head) and is used by dimensions i and
    i + d_head/2. Computed in float64 whatever the compute dtype.
    """
    inv_freq = 1.0 / theta ** (np.arange(0, d_head, 2, dtype=np.float64) / d_head)   # [dh/2]
    ang = positions.astype(np.float64)[:, None] * inv_freq[None, :]               # [T, dh/2]
    ang = np.concatenate([ang, ang], axis=-1)                                      # [T, dh]
    return np.cos(ang).astype(dtype), np.sin(ang).astype(dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate x [T, heads, d_head] by position: x cos + rotate_half(x) sin."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def sinusoidal_rows(positions: np.ndarray, dim: int, padding_idx: int | None) -> np.ndarray:
    """Rows `positions` [T] of fairseq's SinusoidalPositionalEmbedding table, [T, dim] in float64.

    Only the rows asked for are computed (the memory is sized by the prompt, never by a
    position or padding_idx a config claims). Frequencies exp(-i * log(10000) / (half - 1)),
    sines then cosines concatenated (not interleaved), a zero column for odd dim, and zero
    rows at padding_idx. Needs dim >= 4 (fairseq's formula divides by half - 1).
    """
    half = dim // 2
    if half < 2:
        raise ValueError(f"sinusoidal positions need a width of at least 4, got {dim}")
    pos = np.asarray(positions, dtype=np.int64)
    freq = np.exp(np.arange(half, dtype=np.float64) * -(math.log(10000) / (half - 1)))   # [half]
    ang = pos.astype(np.float64)[:, None] * freq[None, :]                                  # [T, half]
    emb = np.concatenate([np.sin(ang), np.cos(ang)], axis=1)                               # [T, 2*half]
    if dim % 2:
        emb = np.concatenate([emb, np.zeros((len(pos), 1))], axis=1)
    if padding_idx is not None:
        emb[pos == padding_idx] = 0
    return emb


def sinusoidal_table(n: int, dim: int, padding_idx: int | None) -> np.ndarray:
    """fairseq's whole SinusoidalPositionalEmbedding table [n, dim] in float64 (rows 0..n-1)."""
    return sinusoidal_rows(np.arange(n), dim, padding_idx)


def fairseq_positions(ids: np.ndarray, padding_idx: int) -> np.ndarray:
    """fairseq's make_positions: non-pad tokens count from padding_idx + 1; pads get padding_idx."""
    mask = ids != padding_idx
    return np.cumsum(mask) * mask + padding_idx
