"""What one forward pass leaves behind: every residual-stream vector, by layer and position.

Naming follows the paper: Lin_i (layer input), Lres_i = Lin_i + ATTN_i,
Lout_i = Lres_i + FFN_i. Decompositions into subvalues are methods that compute on
demand (see decomposition.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from . import decomposition as dec
from .readout import Readout


@dataclass(repr=False)
class LayerTrace:
    """One layer at every position. Shapes: T positions, H heads, H_kv kv heads, F FFN width."""
    lin: np.ndarray        # [T, d]    Lin_i
    attn: np.ndarray       # [T, d]    ATTN_i (bias b_O included)
    lres: np.ndarray       # [T, d]    Lres_i
    ffn: np.ndarray        # [T, d]    FFN_i (bias b_out included)
    lout: np.ndarray       # [T, d]    Lout_i
    q: np.ndarray          # [T, H, dh]     queries (before RoPE)
    k: np.ndarray          # [T, H_kv, dh]  keys (before RoPE)
    v: np.ndarray          # [T, H_kv, dh]  value vectors (bias included)
    pattern: np.ndarray    # [H, T, T]      attention probabilities alpha_h[query, key]
    z: np.ndarray          # [T, H, dh]     sum_j alpha_h[t, j] v_h[j]
    pre: np.ndarray        # [T, F]   FFN pre-activation (SwiGLU: the "up" projection)
    gate_pre: np.ndarray | None   # [T, F] SwiGLU gate pre-activation
    m: np.ndarray          # [T, F]   FFN coefficients m_i^k (Eq. 9)

    def __repr__(self) -> str:
        T, d = self.lin.shape
        return f"LayerTrace(T={T}, d_model={d}, n_heads={self.pattern.shape[0]}, d_ff={self.m.shape[1]})"


@dataclass(repr=False)
class Trace:
    model: object
    ids: np.ndarray            # [T]
    embed_tok: np.ndarray      # [T, d] token part of Lin_0 (embedding scale applied)
    embed_pos: np.ndarray | None   # [T, d] position part (learned / sinusoidal); None for RoPE
    layers: list               # [LayerTrace] * n_layers
    log_probs: np.ndarray      # [T, V] natural-log next-token distribution
    logits: np.ndarray | None  # [T, V] where the family has plain logits

    def __repr__(self) -> str:
        from .display import tokens
        toks = tokens(self.model, self.ids[:12])
        more = f" ... ({self.T} tokens)" if self.T > 12 else ""
        return (f"Trace({os.path.basename(os.path.normpath(self.model.path))!r}, {len(self.layers)} layers, "
                f"{self.T} tokens: {' '.join(toks)}{more})")

    # -- residual stream -------------------------------------------------------------
    @property
    def T(self) -> int:
        return len(self.ids)

    @property
    def Lin0(self) -> np.ndarray:
        """Lin_0 [T, d] (Eq. 2)."""
        return self.embed_tok if self.embed_pos is None else self.embed_tok + self.embed_pos

    def Lin(self, i: int) -> np.ndarray:
        return self.layers[i].lin

    def Lres(self, i: int) -> np.ndarray:
        return self.layers[i].lres

    def Lout(self, i: int) -> np.ndarray:
        return self.layers[i].lout

    def ATTN(self, i: int) -> np.ndarray:
        return self.layers[i].attn

    def FFN(self, i: int) -> np.ndarray:
        return self.layers[i].ffn

    @property
    def final(self) -> np.ndarray:
        """Lout_{L-1} [T, d], the input of the final norm / unembedding."""
        return self.layers[-1].lout if self.layers else self.Lin0

    @property
    def tokens(self) -> list[str]:
        return [self.model.token_str(i) for i in self.ids]

    def readout(self, t: int = -1, kind: str = "frozen") -> Readout:
        """The vocabulary readout at position t (frozen at Lout_{L-1}[t] by default)."""
        return Readout(self.model, self.final[t], kind)

    # -- subvalues (decomposition.py) ------------------------------------------------
    def attn_subvalues(self, i: int, t: int = -1, by: str = "position") -> np.ndarray:
        """Attention subvalues of layer i at query t: by "position" [t+1, d], "head" [H, d],
        "head_position" [H, t+1, d] or "head_neuron_position" [H, d_head, t+1, d] (one per
        attention neuron: head h, head dimension e, source position j). Each family plus
        `attn_bias_subvalue(i)` sums to ATTN_i[t]."""
        fn = {"position": dec.attn_subvalues_by_position, "head": dec.attn_subvalues_by_head,
              "head_position": dec.attn_subvalues_by_head_position,
              "head_neuron_position": dec.attn_subvalues_by_head_neuron_position}
        if by not in fn:
            raise ValueError(f"by must be one of {sorted(fn)}")
        return fn[by](self, i, t)

    def attn_bias_subvalue(self, i: int) -> np.ndarray:
        return dec.attn_bias_subvalue(self, i)

    def ffn_subvalues(self, i: int, t: int = -1, neurons=None) -> np.ndarray:
        """FFN subvalues m^k fc2^k [F, d] of layer i at position t (Eq. 10)."""
        return dec.ffn_subvalues(self, i, t, neurons)

    def ffn_bias_subvalue(self, i: int) -> np.ndarray:
        return dec.ffn_bias_subvalue(self, i)

    def embedding_parts(self, t: int = -1) -> dict[str, np.ndarray]:
        return dec.embedding_parts(self, t)
