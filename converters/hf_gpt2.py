"""Hugging Face GPT-2 (`GPT2LMHeadModel` / `GPT2Model`) directories to the canonical format.

Weights: model.safetensors (single or sharded) or pytorch_model.bin (single or sharded),
keys with or without the `transformer.` prefix. GPT-2 uses `Conv1D`, whose weights are
stored [in, out]; `c_attn` holds [q | k | v] column blocks. The attention-mask buffers
`attn.bias` / `attn.masked_bias` of old checkpoints are ignored. Tensors keep their
stored precision (F32/F16/BF16) bit for bit.

Config: `layer_norm_epsilon`, `activation_function` ("gelu_new" / "gelu_pytorch_tanh":
tanh GELU; "gelu": exact erf GELU; "relu"), learned positions (`n_positions`),
`n_inner` (default 4 * n_embd), `tie_word_embeddings` (default true; an `lm_head.weight`
that differs from `wte` is written as `unembed.W_U`). `scale_attn_by_inverse_layer_idx`
and `scale_attn_weights: false` change the attention maths and are refused;
`reorder_and_upcast_attn` only changes float rounding and is accepted.
"""
from __future__ import annotations

import os
import re

from refimpl.config import MAX_EPS
from refimpl.errors import FormatError

from .common import bias_to_heads, linear_to_heads, out_to_heads
from .hf_common import (cfg_bool, cfg_float, cfg_int, check_layer_count, detect_hf, finish, open_weights, planned,
                        read_hf_config)

FORMAT = "hf-gpt2"
ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def detect(src: str) -> bool:
    return detect_hf(src, "gpt2")


def _config(src: str) -> tuple[dict, dict]:
    hf = read_hf_config(src)
    where = os.path.join(src, "config.json")
    mt = hf.get("model_type")
    if mt not in (None, "gpt2"):
        raise FormatError(f"{where}: model_type is {mt!r}, not a GPT-2 model")
    if cfg_bool(hf, "scale_attn_by_inverse_layer_idx", False, src=src):
        raise FormatError(f"{where}: scale_attn_by_inverse_layer_idx=true (attention scores divided by "
                          f"layer index) is not supported")
    if not cfg_bool(hf, "scale_attn_weights", True, src=src):
        raise FormatError(f"{where}: scale_attn_weights=false (unscaled attention scores) is not supported")
    if cfg_bool(hf, "add_cross_attention", False, src=src):
        raise FormatError(f"{where}: add_cross_attention=true (an encoder-decoder GPT-2) is not supported")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise FormatError(f"{where}: activation_function {act!r} is not supported "
                          f"(known: {', '.join(ACTIVATIONS)})")
    d = cfg_int(hf, "n_embd", src=src)
    H = cfg_int(hf, "n_head", src=src)
    if d % H:
        raise FormatError(f"{where}: n_embd {d} is not a multiple of n_head {H}")
    cfg = dict(family="gpt2", d_model=d, n_layers=cfg_int(hf, "n_layer", src=src), n_heads=H, n_kv_heads=H,
               d_head=d // H, d_ff=cfg_int(hf, "n_inner", 4 * d, src=src) if hf.get("n_inner") else 4 * d,
               d_vocab=cfg_int(hf, "vocab_size", src=src), n_ctx=cfg_int(hf, "n_positions", src=src),
               norm="layernorm", norm_eps=cfg_float(hf, "layer_norm_epsilon", 1e-5, src=src, hi=MAX_EPS),
               final_norm=True, act=ACTIVATIONS[act], gated_ffn=False, positions="learned",
               embed_scale=1.0, embedding="linear", unembedding="linear",
               tie_word_embeddings=cfg_bool(hf, "tie_word_embeddings", True, src=src),
               attn_bias=True, mlp_bias=True, prepend_ids=[])
    return hf, cfg


def convert(src: str, dst: str, force: bool = False, tokenizer: str | None = None) -> str:
    hf, cfg = _config(src)
    w = open_weights(src).strip_prefix(("transformer.",), keep=("lm_head.weight",))
    d, L, H, dh, F, V, P = (cfg[k] for k in ("d_model", "n_layers", "n_heads", "d_head", "d_ff", "d_vocab", "n_ctx"))

    check_layer_count(w, "h.", L)
    known = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight"}
    for i in range(L):
        for part in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.weight",
                     "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_fc.weight",
                     "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"):
            known.add(f"h.{i}.{part}")
    mask_buffer = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")     # old causal-mask buffers
    w.check_known(known, ignore=lambda k: bool(mask_buffer.match(k)))

    plan = []

    def add(name: str, src_name: str, src_shape: tuple, shape: tuple, fn=lambda a: a):
        w.check_shape(src_name, src_shape)
        plan.append(planned(name, shape, w.dtype(src_name), lambda: fn(w.raw(src_name))))

    add("embed.W_E", "wte.weight", (V, d), (V, d))
    add("pos_embed.W_pos", "wpe.weight", (P, d), (P, d))
    for i in range(L):
        h, b = f"h.{i}.", f"blocks.{i}."
        add(b + "ln1.w", h + "ln_1.weight", (d,), (d,))
        add(b + "ln1.b", h + "ln_1.bias", (d,), (d,))
        for j, m in enumerate("QKV"):      # c_attn: Conv1D [d, 3d], columns [q | k | v]
            add(b + f"attn.W_{m}", h + "attn.c_attn.weight", (d, 3 * d), (H, d, dh),
                lambda a, j=j: linear_to_heads(a[:, j * d:(j + 1) * d].T, H))
            add(b + f"attn.b_{m}", h + "attn.c_attn.bias", (3 * d,), (H, dh),
                lambda a, j=j: bias_to_heads(a[j * d:(j + 1) * d], H))
        add(b + "attn.W_O", h + "attn.c_proj.weight", (d, d), (H, dh, d), lambda a: out_to_heads(a.T, H))
        add(b + "attn.b_O", h + "attn.c_proj.bias", (d,), (d,))
        add(b + "ln2.w", h + "ln_2.weight", (d,), (d,))
        add(b + "ln2.b", h + "ln_2.bias", (d,), (d,))
        add(b + "mlp.W_in", h + "mlp.c_fc.weight", (d, F), (d, F))
        add(b + "mlp.b_in", h + "mlp.c_fc.bias", (F,), (F,))
        add(b + "mlp.W_out", h + "mlp.c_proj.weight", (F, d), (F, d))
        add(b + "mlp.b_out", h + "mlp.c_proj.bias", (d,), (d,))
    add("ln_final.w", "ln_f.weight", (d,), (d,))
    add("ln_final.b", "ln_f.bias", (d,), (d,))

    return finish(src, dst, hf, cfg, w, add, plan, "wte.weight", "gpt2", FORMAT, tokenizer, force)
