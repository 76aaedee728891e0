"""Hugging Face Llama (`LlamaForCausalLM`) directories to the canonical format.

Weights: model.safetensors (single or sharded) or pytorch_model.bin (single or sharded),
F32/F16/BF16 kept bit for bit. Keys with or without the `model.` prefix; stale
`rotary_emb.inv_freq` buffers are ignored. HF's q/k projection rows are already in the
half-split RoPE order (transformers' conversion script permuted them), which is the
canonical one: no permutation here. Grouped-query attention via `num_key_value_heads`.

Config: `rms_norm_eps`, `rope_theta` (transformers 4.x) or `rope_parameters.rope_theta`
(5.x), default 10000; any RoPE scaling is refused. `head_dim` if present (else
hidden_size / heads), `tie_word_embeddings`, `attention_bias` (q/k/v/o biases) and
`mlp_bias` (up/down biases; a non-zero gate bias has no place in the canonical format and
is refused). BOS (`bos_token_id`, default 1) is prepended to tokenized text.
"""
from __future__ import annotations

import math
import os

import numpy as np

from refimpl.config import MAX_EPS, short
from refimpl.errors import FormatError

from .common import bias_to_heads, linear_to_heads, out_to_heads
from .hf_common import (cfg_bool, cfg_float, cfg_int, check_layer_count, detect_hf, finish, open_weights, planned,
                        read_hf_config, token_id)

FORMAT = "hf-llama"


def detect(src: str) -> bool:
    return detect_hf(src, "llama")


def rope_theta(hf: dict, where: str) -> float:
    """RoPE base from a 4.x (`rope_theta`, `rope_scaling`) or 5.x (`rope_parameters`) config;
    FormatError for any scaled RoPE variant."""
    theta = hf.get("rope_theta")
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    for what, p in (("rope_scaling", scaling), ("rope_parameters", params)):
        if p is None:
            continue
        if not isinstance(p, dict):
            raise FormatError(f"{where}: {what} must be an object or null, got {p!r}")
        kind = p.get("rope_type", p.get("type", "default"))
        if kind != "default":
            raise FormatError(f"{where}: {what} of type {kind!r} (scaled RoPE) is not supported; "
                              f"only plain RoPE is")
        if p.get("rope_theta") is not None:
            theta = p["rope_theta"]
    if theta is None:
        theta = 10000.0
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
        raise FormatError(f"{where}: rope_theta must be a positive finite number, got {short(theta)}")
    return float(theta)


def _config(src: str) -> tuple[dict, dict]:
    hf = read_hf_config(src)
    where = os.path.join(src, "config.json")
    mt = hf.get("model_type")
    if mt not in (None, "llama"):
        raise FormatError(f"{where}: model_type is {mt!r}, not a Llama model")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise FormatError(f"{where}: hidden_act {act!r} is not supported (Llama uses silu)")
    d = cfg_int(hf, "hidden_size", src=src)
    H = cfg_int(hf, "num_attention_heads", src=src)
    Hk = cfg_int(hf, "num_key_value_heads", H, src=src) if hf.get("num_key_value_heads") is not None else H
    if H % Hk:
        raise FormatError(f"{where}: num_attention_heads {H} is not a multiple of num_key_value_heads {Hk}")
    if hf.get("head_dim") is not None:
        dh = cfg_int(hf, "head_dim", src=src)
    elif d % H:
        raise FormatError(f"{where}: hidden_size {d} is not a multiple of num_attention_heads {H}")
    else:
        dh = d // H
    if dh % 2:
        raise FormatError(f"{where}: head dimension {dh} is odd; RoPE needs an even one")
    V = cfg_int(hf, "vocab_size", src=src)
    bos = token_id(hf.get("bos_token_id", 1), V)
    cfg = dict(family="llama", d_model=d, n_layers=cfg_int(hf, "num_hidden_layers", src=src), n_heads=H,
               n_kv_heads=Hk, d_head=dh, d_ff=cfg_int(hf, "intermediate_size", src=src), d_vocab=V,
               n_ctx=cfg_int(hf, "max_position_embeddings", 2048, src=src),
               norm="rmsnorm", norm_eps=cfg_float(hf, "rms_norm_eps", 1e-6, src=src, hi=MAX_EPS), final_norm=True,
               act="silu", gated_ffn=True, positions="rope", rope_theta=rope_theta(hf, where),
               embed_scale=1.0, embedding="linear", unembedding="linear",
               tie_word_embeddings=cfg_bool(hf, "tie_word_embeddings", False, src=src),
               attn_bias=cfg_bool(hf, "attention_bias", False, src=src),
               mlp_bias=cfg_bool(hf, "mlp_bias", False, src=src),
               prepend_ids=[1 if bos is None else bos])
    return hf, cfg


def convert(src: str, dst: str, force: bool = False, tokenizer: str | None = None) -> str:
    hf, cfg = _config(src)
    w = open_weights(src).strip_prefix(("model.",), keep=("lm_head.weight",))
    d, L, H, Hk, dh, F, V = (cfg[k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_head",
                                                 "d_ff", "d_vocab"))
    attn_bias, mlp_bias = cfg["attn_bias"], cfg["mlp_bias"]

    check_layer_count(w, "layers.", L)
    known = {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    for i in range(L):
        parts = ["input_layernorm.weight", "post_attention_layernorm.weight"]
        parts += [f"self_attn.{p}_proj.weight" for p in "qkvo"] + [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        if attn_bias:
            parts += [f"self_attn.{p}_proj.bias" for p in "qkvo"]
        if mlp_bias:
            parts += [f"mlp.{p}_proj.bias" for p in ("gate", "up", "down")]
        known.update(f"layers.{i}.{p}" for p in parts)
    w.check_known(known, ignore=lambda k: k.endswith("rotary_emb.inv_freq"))

    plan = []

    def add(name: str, src_name: str, src_shape: tuple, shape: tuple, fn=lambda a: a):
        w.check_shape(src_name, src_shape)
        plan.append(planned(name, shape, w.dtype(src_name), lambda: fn(w.raw(src_name))))

    add("embed.W_E", "embed_tokens.weight", (V, d), (V, d))
    for i in range(L):
        h, b = f"layers.{i}.", f"blocks.{i}."
        a = h + "self_attn."
        add(b + "ln1.w", h + "input_layernorm.weight", (d,), (d,))
        add(b + "attn.W_Q", a + "q_proj.weight", (H * dh, d), (H, d, dh), lambda x: linear_to_heads(x, H))
        add(b + "attn.W_K", a + "k_proj.weight", (Hk * dh, d), (Hk, d, dh), lambda x: linear_to_heads(x, Hk))
        add(b + "attn.W_V", a + "v_proj.weight", (Hk * dh, d), (Hk, d, dh), lambda x: linear_to_heads(x, Hk))
        add(b + "attn.W_O", a + "o_proj.weight", (d, H * dh), (H, dh, d), lambda x: out_to_heads(x, H))
        if attn_bias:
            add(b + "attn.b_Q", a + "q_proj.bias", (H * dh,), (H, dh), lambda x: bias_to_heads(x, H))
            add(b + "attn.b_K", a + "k_proj.bias", (Hk * dh,), (Hk, dh), lambda x: bias_to_heads(x, Hk))
            add(b + "attn.b_V", a + "v_proj.bias", (Hk * dh,), (Hk, dh), lambda x: bias_to_heads(x, Hk))
            add(b + "attn.b_O", a + "o_proj.bias", (d,), (d,))
        add(b + "ln2.w", h + "post_attention_layernorm.weight", (d,), (d,))
        add(b + "mlp.W_gate", h + "mlp.gate_proj.weight", (F, d), (d, F), lambda x: x.T)
        add(b + "mlp.W_in", h + "mlp.up_proj.weight", (F, d), (d, F), lambda x: x.T)
        add(b + "mlp.W_out", h + "mlp.down_proj.weight", (d, F), (F, d), lambda x: x.T)
        if mlp_bias:
            gate = h + "mlp.gate_proj.bias"
            w.check_shape(gate, (F,))
            if np.any(np.asarray(w[gate].numpy()) != 0):
                raise FormatError(f"{w.where()}: {gate} is non-zero; a gate bias has no place in the "
                                  f"canonical format")
            add(b + "mlp.b_in", h + "mlp.up_proj.bias", (F,), (F,))
            add(b + "mlp.b_out", h + "mlp.down_proj.bias", (d,), (d,))
    add("ln_final.w", "norm.weight", (d,), (d,))

    return finish(src, dst, hf, cfg, w, add, plan, "embed_tokens.weight", "llama", FORMAT, tokenizer, force)
