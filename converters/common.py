"""Layout changes every converter needs, written once.

PyTorch `nn.Linear` stores a weight as [out, in]; the canonical format uses
TransformerLens's [in, out]-style per-head shapes (docs/format.md).
"""
from __future__ import annotations

import numpy as np


def interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permute q/k projection rows [H*dh, d] from interleaved RoPE pairs (Meta, llama2.c:
    dims (2i, 2i+1) rotate together) to the half-split convention (HF, canonical: dims
    (i, i + dh/2)). Same permutation as transformers' convert_llama_weights_to_hf."""
    out, d = w.shape
    dh = out // n_heads
    return w.reshape(n_heads, dh // 2, 2, d).transpose(0, 2, 1, 3).reshape(out, d)


def half_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `interleaved_to_half` (used by tests that build Meta checkpoints)."""
    out, d = w.shape
    dh = out // n_heads
    return w.reshape(n_heads, 2, dh // 2, d).transpose(0, 2, 1, 3).reshape(out, d)


def linear_to_heads(w: np.ndarray, n_heads: int) -> np.ndarray:
    """nn.Linear weight [H*dh, d] of a q/k/v projection -> W_Q-style [H, d, dh]."""
    out, d = w.shape
    return w.reshape(n_heads, out // n_heads, d).transpose(0, 2, 1)


def bias_to_heads(b: np.ndarray, n_heads: int) -> np.ndarray:
    """[H*dh] -> [H, dh]."""
    return b.reshape(n_heads, -1)


def out_to_heads(w: np.ndarray, n_heads: int) -> np.ndarray:
    """nn.Linear weight [d, H*dh] of the output projection -> W_O [H, dh, d]."""
    d, inner = w.shape
    return w.T.reshape(n_heads, inner // n_heads, d)


def st_dtype(np_dtype) -> str:
    """safetensors dtype name of a float numpy dtype (BF16 sources are handled by their readers)."""
    return {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
            np.dtype(np.float64): "F64"}[np.dtype(np_dtype)]
