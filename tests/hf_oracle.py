"""The real library as the oracle for the HF / Meta converters (tests/test_hf_converters.py).

Builds tiny random transformers models (every norm weight/bias and every bias randomised
so each term matters), saves them in the layouts people actually have on disk, and runs
them in float64 to produce the reference residual stream and log-probs.

Exactness patches (`exact_float64`): in transformers 5.x three Llama pieces compute in
float32 even in a float64 model, which would cap agreement at ~1e-7:
  1. `LlamaRMSNorm.forward` upcasts to float32 -> replaced by the same formula in the
     input dtype (weight * x * rsqrt(mean(x^2) + eps)).
  2. `LlamaRotaryEmbedding.forward` builds inv_freq and the angles in float32 ->
     recomputed in float64 from the config (theta^(-2i/dh), angles = position * inv_freq).
  3. `eager_attention_forward` (Llama) does softmax with dtype=float32 -> softmax in the
     query's dtype.
GPT-2 needs no patch: its LayerNorm, gelu_new and eager attention all run in float64.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os

from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)


# --- building models ------------------------------------------------------------------------

def randomize_(model, seed: int, scale: float = 0.2):
    """Random weights: matrices N(0, scale^2), norm weights 1 + N(0, 0.2^2), biases N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.ndim >= 2:
                p.copy_(r * scale)
            elif name.endswith("bias"):
                p.copy_(r * 0.1)
            else:                                   # LayerNorm / RMSNorm weight
                p.copy_(1.0 + 0.2 * r)
    return model


def tiny_gpt2(vocab: int = 100, seed: int = 0, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel
    args = dict(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                bos_token_id=min(50256, vocab - 1), eos_token_id=min(50256, vocab - 1),
                attn_implementation="eager")
    args.update(kw)
    cfg = GPT2Config(**args)
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(cfg).eval()
    randomize_(m, seed)
    if cfg.tie_word_embeddings:
        m.tie_weights()
    return m


def tiny_llama(vocab: int = 100, seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    args = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                attn_implementation="eager")
    args.update(kw)
    cfg = LlamaConfig(**args)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg).eval()
    randomize_(m, seed)
    return m


def rounded(model, dtype):
    """A copy of `model` with its weights in `dtype` (what an fp16/bf16 checkpoint holds)."""
    return copy.deepcopy(model).to(dtype)


# --- saving -----------------------------------------------------------------------------------

def _state_dict(model, prefix_strip: str | None = None, extra: dict | None = None, drop=()) -> dict:
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k not in drop}
    if prefix_strip:
        sd = {(k[len(prefix_strip):] if k.startswith(prefix_strip) else k): v for k, v in sd.items()}
    if extra:
        sd.update(extra)
    return sd


def save(model, d: str, how: str, *, strip_prefix: str | None = None, extra: dict | None = None,
         drop=()) -> str:
    """Save `model` (weights in their current dtype) into directory `d`.

    how: "safetensors" (save_pretrained), "safetensors-sharded" (save_pretrained with a tiny
    max_shard_size), "bin-zip" / "bin-legacy" (torch.save of the state dict, zip or legacy
    serialization), "bin-sharded" (two torch.save shards + pytorch_model.bin.index.json).
    `strip_prefix` removes a key prefix (e.g. "transformer."), `drop` removes keys and
    `extra` adds entries (e.g. the old attn.bias buffers); only for the torch.save layouts.
    """
    os.makedirs(d, exist_ok=True)
    if how in ("safetensors", "safetensors-sharded"):
        assert not strip_prefix and not extra and not drop
        kw = {"max_shard_size": "20KB"} if how == "safetensors-sharded" else {}
        model.save_pretrained(d, **kw)
        return d
    model.config.save_pretrained(d)
    sd = _state_dict(model, strip_prefix, extra, drop)
    if how == "bin-zip":
        torch.save(sd, os.path.join(d, "pytorch_model.bin"))
    elif how == "bin-legacy":
        torch.save(sd, os.path.join(d, "pytorch_model.bin"), _use_new_zipfile_serialization=False)
    elif how == "bin-sharded":
        keys = list(sd)
        half = len(keys) // 2
        names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
        weight_map = {}
        for fname, part in zip(names, (keys[:half], keys[half:])):
            torch.save({k: sd[k] for k in part}, os.path.join(d, fname))
            weight_map.update({k: fname for k in part})
        with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    else:
        raise ValueError(how)
    return d


# --- exact float64 reference ---------------------------------------------------------------------

@contextlib.contextmanager
def exact_float64():
    """Make transformers' Llama compute everything in the model dtype (see module docstring)."""
    from transformers.models.llama import modeling_llama as ml

    def rms_forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

    def rope_forward(self, x, position_ids):
        cfg = self.config
        theta = cfg.rope_parameters["rope_theta"]
        dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        inv_freq = 1.0 / (theta ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
        ang = position_ids[..., None].to(torch.float64) * inv_freq
        emb = torch.cat((ang, ang), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    orig_eager = ml.eager_attention_forward

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k = ml.repeat_kv(key, module.num_key_value_groups)
        v = ml.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = torch.nn.functional.softmax(w, dim=-1)          # in the query dtype (float64)
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    saved = (ml.LlamaRMSNorm.forward, ml.LlamaRotaryEmbedding.forward)
    ml.LlamaRMSNorm.forward = rms_forward
    ml.LlamaRotaryEmbedding.forward = rope_forward
    ml.eager_attention_forward = eager
    try:
        yield
    finally:
        ml.LlamaRMSNorm.forward, ml.LlamaRotaryEmbedding.forward = saved
        ml.eager_attention_forward = orig_eager


def reference(model, ids: list[int]) -> dict:
    """float64 run of (a copy of) `model` on ids: hidden states, pre-final-norm state, log-probs."""
    m = copy.deepcopy(model).to(torch.float64).eval()
    final_norm = m.transformer.ln_f if hasattr(m, "transformer") else m.model.norm
    captured = {}

    def grab(mod, inp, out):          # must return None: a returned value would replace the output
        captured["pre"] = inp[0]
    hook = final_norm.register_forward_hook(grab)
    try:
        with torch.no_grad(), exact_float64():
            out = m(torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    finally:
        hook.remove()
    return {"hidden": [h[0].numpy() for h in out.hidden_states],
            "pre_final": captured["pre"][0].numpy(),
            "log_probs": torch.log_softmax(out.logits[0], dim=-1).numpy()}


def compare(trace, ref: dict) -> dict:
    """Max abs differences between a refimpl Trace and `reference` output."""
    L = len(trace.layers)
    hid = ref["hidden"]
    assert len(hid) == L + 1
    res = max(float(np.abs(trace.layers[i].lin - hid[i]).max()) for i in range(L))
    pre = float(np.abs(trace.layers[L - 1].lout - ref["pre_final"]).max())
    lp = float(np.abs(trace.log_probs - ref["log_probs"]).max())
    return {"residual": max(res, pre), "log_probs": lp}
