#!/usr/bin/env python
"""Synthetic SOURCE checkpoints with the real shapes and deterministic random weights.

    python benchmarks/synth.py gpt2-medium baevski-wiki103 llama-7b llama-13b [--force]

writes, under $REFIMPL_BENCH_ROOT/src (default /work/bench/src), each in the layout of the
real release so that `refimpl convert` is exercised as on the real thing:

- gpt2-medium: Hugging Face directory (config.json model_type gpt2, model.safetensors fp32,
  keys without the `transformer.` prefix, tied lm_head not stored), vocab.json + merges.txt
  (the real GPT-2 BPE files).
- baevski-wiki103: fairseq `model.pt` (torch zip serialisation; top-level `args`
  argparse.Namespace with the transformer_lm_wiki103 options, `model` OrderedDict, tied
  adaptive-softmax tensors repeated under their softmax names sharing one storage, as
  fairseq writes them) + the real 267,744-symbol wiki103 `dict.txt`. fp32.
- llama-7b: Hugging Face directory, fp16, two safetensors shards + index, `lm_head` untied,
  tokenizer.model (the real LLaMA SentencePiece model).
- llama-13b: Meta release layout: params.json, consolidated.00.pth and consolidated.01.pth
  (model-parallel halves: column-parallel weights split on dim 0, row-parallel on dim 1,
  norms replicated, plus rope.freqs), fp16, tokenizer.model.

Weights ~ N(0, 0.02) (fairseq embeddings N(0, d^-1/2), since they are scaled by sqrt(d)),
norm gains 1 + N(0, 0.02), biases N(0, 0.02): activations stay finite in fp16. Every tensor
is generated from its own seed and written as soon as it is made (peak memory: one
tensor). A directory is complete when its `.complete` marker exists; otherwise it is
regenerated.
"""
from __future__ import annotations

import argparse
import argparse as _argparse
import collections
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import torchzip  # noqa: E402
from benchmarks.models import ORDER, SPECS, TOKENIZERS  # noqa: E402
from refimpl.safetensors_io import write_safetensors  # noqa: E402

SEED = 20250101
STD = 0.02
MARK = ".complete"


def _rng(name: str) -> np.random.Generator:
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.default_rng([SEED, h])


def normal(name: str, shape, dtype, std: float = STD, mean: float = 0.0) -> np.ndarray:
    """Deterministic N(mean, std) values for a tensor name, generated in float32."""
    a = _rng(name).standard_normal(int(np.prod(shape)), dtype=np.float32)
    a *= np.float32(std)
    if mean:
        a += np.float32(mean)
    return a.reshape(shape).astype(dtype, copy=False)


def init(name: str, shape, dtype) -> np.ndarray:
    """Norm gains ~1, everything else small (names are the source's own)."""
    low = name.lower()
    if low.endswith("weight") and ("norm" in low or ".ln_" in low or low.startswith("ln_")):
        return normal(name, shape, dtype, STD, 1.0)
    return normal(name, shape, dtype)


def _done(d: str) -> bool:
    return os.path.exists(os.path.join(d, MARK))


def _fresh(d: str) -> None:
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)


def _finish(d: str, t0: float) -> None:
    with open(os.path.join(d, MARK), "w") as f:
        f.write(f"{time.time() - t0:.1f}\n")


def _log(msg: str) -> None:
    print(f"[synth {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- GPT2-medium (HF) ---------------------------------------------------------------------

def gpt2(spec, d: str) -> None:
    a = spec.arch
    L, D, H, V, P = a["n_layer"], a["n_embd"], a["n_head"], a["vocab_size"], a["n_positions"]
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
           "n_layer": L, "n_embd": D, "n_head": H, "vocab_size": V, "n_positions": P, "n_ctx": P,
           "layer_norm_epsilon": 1e-5, "bos_token_id": 50256, "eos_token_id": 50256,
           "initializer_range": 0.02, "torch_dtype": "float32"}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    shutil.copyfile(os.path.join(TOKENIZERS, "gpt2", "encoder.json"), os.path.join(d, "vocab.json"))
    shutil.copyfile(os.path.join(TOKENIZERS, "gpt2", "vocab.bpe"), os.path.join(d, "merges.txt"))
    specs = [("wte.weight", (V, D)), ("wpe.weight", (P, D))]
    for i in range(L):
        h = f"h.{i}."
        specs += [(h + "ln_1.weight", (D,)), (h + "ln_1.bias", (D,)),
                  (h + "attn.c_attn.weight", (D, 3 * D)), (h + "attn.c_attn.bias", (3 * D,)),
                  (h + "attn.c_proj.weight", (D, D)), (h + "attn.c_proj.bias", (D,)),
                  (h + "ln_2.weight", (D,)), (h + "ln_2.bias", (D,)),
                  (h + "mlp.c_fc.weight", (D, 4 * D)), (h + "mlp.c_fc.bias", (4 * D,)),
                  (h + "mlp.c_proj.weight", (4 * D, D)), (h + "mlp.c_proj.bias", (D,))]
    specs += [("ln_f.weight", (D,)), ("ln_f.bias", (D,))]
    write_safetensors(os.path.join(d, "model.safetensors"), [(n, s, "F32") for n, s in specs],
                      ((n, init(n, s, np.float32)) for n, s in specs), {"format": "pt"})


# --- Baevski & Auli wiki103 (fairseq) ---------------------------------------------------------

def baevski(spec, d: str) -> None:
    a = spec.arch
    L, D, F, H = a["layers"], a["d"], a["ffn"], a["heads"]
    dict_src = os.path.join(TOKENIZERS, "wiki103", "dict.txt")
    shutil.copyfile(dict_src, os.path.join(d, "dict.txt"))
    with open(dict_src, encoding="utf-8") as f:
        V = 4 + sum(1 for line in f if line.strip())
    cut = list(a["cutoffs"]) + [V]
    bands = [(0 if c == 0 else cut[c - 1], cut[c]) for c in range(len(cut))]
    dims = [D // a["factor"] ** c for c in range(len(bands))]
    T = torchzip.LazyTensor
    f32 = np.float32

    def lazy(name, shape, std=STD, mean=0.0):
        return T(shape, f32, lambda: normal(name, shape, f32, std, mean))

    sd = collections.OrderedDict()
    sd["decoder.version"] = T((1,), f32, lambda: np.array([3.0], f32))
    emb, proj = [], []
    for c, ((lo, hi), dc) in enumerate(zip(bands, dims)):
        e = f"decoder.embed_tokens.embeddings.{c}."
        emb.append(lazy(e + "0.weight", (hi - lo, dc), std=D ** -0.5))     # scaled by sqrt(d) in forward
        proj.append(lazy(e + "1.weight", (D, dc), std=dc ** -0.5))
        sd[e + "0.weight"], sd[e + "1.weight"] = emb[-1], proj[-1]
    sd["decoder.embed_positions._float_tensor"] = T((1,), f32, lambda: np.zeros(1, f32))
    for i in range(L):
        p = f"decoder.layers.{i}."
        for m in ("k", "v", "q", "out"):
            sd[p + f"self_attn.{m}_proj.weight"] = lazy(p + f"self_attn.{m}_proj.weight", (D, D))
            sd[p + f"self_attn.{m}_proj.bias"] = lazy(p + f"self_attn.{m}_proj.bias", (D,))
        sd[p + "self_attn_layer_norm.weight"] = lazy(p + "self_attn_layer_norm.weight", (D,), mean=1.0)
        sd[p + "self_attn_layer_norm.bias"] = lazy(p + "self_attn_layer_norm.bias", (D,))
        sd[p + "fc1.weight"] = lazy(p + "fc1.weight", (F, D))
        sd[p + "fc1.bias"] = lazy(p + "fc1.bias", (F,))
        sd[p + "fc2.weight"] = lazy(p + "fc2.weight", (D, F))
        sd[p + "fc2.bias"] = lazy(p + "fc2.bias", (D,))
        sd[p + "final_layer_norm.weight"] = lazy(p + "final_layer_norm.weight", (D,), mean=1.0)
        sd[p + "final_layer_norm.bias"] = lazy(p + "final_layer_norm.bias", (D,))
    s = "decoder.adaptive_softmax."
    sd[s + "version"] = T((1,), np.int64, lambda: np.array([1], np.int64))
    sd[s + "head._float_tensor"] = T((1,), f32, lambda: np.zeros(1, f32))
    sd[s + "head.word_proj.weight"] = emb[0]                                # tied: the same tensor
    sd[s + "head.class_proj.weight"] = lazy(s + "head.class_proj.weight", (len(bands) - 1, D))
    for c in range(1, len(bands)):
        sd[s + f"tail.{c - 1}.0.weight"] = proj[c]
        sd[s + f"tail.{c - 1}.2.weight"] = emb[c]
    ns = _argparse.Namespace(
        arch="transformer_lm_wiki103", task="language_modeling", criterion="adaptive_loss",
        decoder_embed_dim=D, decoder_input_dim=D, decoder_output_dim=D, decoder_ffn_embed_dim=F,
        decoder_layers=L, decoder_attention_heads=H, decoder_normalize_before=True,
        decoder_learned_pos=False, activation_fn="relu", dropout=0.3, attention_dropout=0.1,
        activation_dropout=0.1, adaptive_input=True, adaptive_input_factor=a["factor"],
        adaptive_input_cutoff=",".join(map(str, a["cutoffs"])),
        adaptive_softmax_cutoff=",".join(map(str, a["cutoffs"])), adaptive_softmax_factor=a["factor"],
        adaptive_softmax_dropout=0.2, tie_adaptive_weights=True, tie_adaptive_proj=True,
        no_decoder_final_norm=True, no_token_positional_embeddings=False, character_embeddings=False,
        share_decoder_input_output_embed=False, no_scale_embedding=False, layernorm_embedding=False,
        tokens_per_sample=a["tokens_per_sample"], max_target_positions=a["tokens_per_sample"],
        sample_break_mode="none", add_bos_token=False, seed=1, fp16=False)
    obj = {"args": ns, "model": sd, "optimizer_history": [
        {"criterion_name": "AdaptiveLoss", "optimizer_name": "NAG", "lr_scheduler_state": {"best": 3.0},
         "num_updates": 286000}], "extra_state": {"epoch": 1, "val_loss": 3.0}}
    torchzip.save(obj, os.path.join(d, "model.pt"))


# --- Llama-7B (HF, sharded fp16 safetensors) --------------------------------------------------

def llama_hf(spec, d: str) -> None:
    a = spec.arch
    L, D, H, F, V = a["layers"], a["d"], a["heads"], a["ffn"], a["vocab"]
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "hidden_size": D, "intermediate_size": F, "num_attention_heads": H, "num_hidden_layers": L,
           "num_key_value_heads": H, "vocab_size": V, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
           "tie_word_embeddings": False, "torch_dtype": "float16", "initializer_range": 0.02,
           "rope_theta": 10000.0}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    shutil.copyfile(os.path.join(TOKENIZERS, "llama", "tokenizer.model"), os.path.join(d, "tokenizer.model"))
    specs = [("model.embed_tokens.weight", (V, D))]
    for i in range(L):
        p = f"model.layers.{i}."
        specs += [(p + f"self_attn.{m}_proj.weight", (D, D)) for m in "qkvo"]
        specs += [(p + "mlp.gate_proj.weight", (F, D)), (p + "mlp.up_proj.weight", (F, D)),
                  (p + "mlp.down_proj.weight", (D, F)),
                  (p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,))]
    specs += [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]
    n = a["shards"]
    per = -(-len(specs) // n)
    shards = [specs[k * per:(k + 1) * per] for k in range(n)]
    names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map, total = {}, 0
    for fname, sh in zip(names, shards):
        _log(f"  {fname}: {len(sh)} tensors")
        write_safetensors(os.path.join(d, fname), [(nm, s, "F16") for nm, s in sh],
                          ((nm, init(nm, s, np.float16)) for nm, s in sh), {"format": "pt"})
        weight_map.update({nm: fname for nm, _ in sh})
        total += sum(2 * int(np.prod(s)) for _, s in sh)
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# --- Llama-13B (Meta consolidated.NN.pth) -----------------------------------------------------

META_SPLIT = {"attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
              "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w2.weight": 1,
              "feed_forward.w3.weight": 0, "attention_norm.weight": None, "ffn_norm.weight": None}


def llama_meta(spec, d: str) -> None:
    a = spec.arch
    L, D, H, F, V, mp = a["layers"], a["d"], a["heads"], a["ffn"], a["vocab"], a["mp"]
    with open(os.path.join(d, "params.json"), "w") as f:
        json.dump({"dim": D, "multiple_of": a["multiple_of"], "n_heads": H, "n_layers": L,
                   "norm_eps": 1e-05, "vocab_size": -1}, f)
    shutil.copyfile(os.path.join(TOKENIZERS, "llama", "tokenizer.model"), os.path.join(d, "tokenizer.model"))
    full = {"tok_embeddings.weight": ((V, D), 1), "norm.weight": ((D,), None), "output.weight": ((V, D), 0)}
    shapes = {"attention.wq.weight": (D, D), "attention.wk.weight": (D, D), "attention.wv.weight": (D, D),
              "attention.wo.weight": (D, D), "feed_forward.w1.weight": (F, D), "feed_forward.w2.weight": (D, F),
              "feed_forward.w3.weight": (F, D), "attention_norm.weight": (D,), "ffn_norm.weight": (D,)}
    order = ["tok_embeddings.weight", "norm.weight", "output.weight"]
    for i in range(L):
        for k in ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
                  "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
                  "attention_norm.weight", "ffn_norm.weight"):
            full[f"layers.{i}.{k}"] = (shapes[k], META_SPLIT[k])
            order.append(f"layers.{i}.{k}")
    f16 = np.float16
    for r in range(mp):
        sd = collections.OrderedDict()
        for name in order:
            shape, dim = full[name]
            if dim is None:       # replicated: the same values in every shard
                sd[name] = torchzip.LazyTensor(shape, f16, lambda n=name, s=shape: init(n, s, f16))
            else:
                part = list(shape)
                part[dim] //= mp
                sd[name] = torchzip.LazyTensor(part, f16, lambda n=f"{name}#{r}", s=tuple(part): init(n, s, f16))
        half = D // H // 2
        sd["rope.freqs"] = torchzip.LazyTensor(
            (half,), f16, lambda: (1.0 / 10000.0 ** (np.arange(0, 2 * half, 2)[:half] / (2 * half))).astype(f16))
        fname = os.path.join(d, f"consolidated.{r:02d}.pth")
        _log(f"  {os.path.basename(fname)}: {len(sd)} tensors")
        torchzip.save(sd, fname, progress=_progress(f"consolidated.{r:02d}"))


class _FakeShardTensor:
    """One model-parallel slice as the Meta converter reads it (shape, dtype, raw()), with the
    values synth.llama_meta would have written to consolidated.NN.pth."""

    def __init__(self, shape, make):
        self.shape, self.dtype, self._make = tuple(shape), "F16", make

    def raw(self):
        return self._make()


def llama_meta_canonical(spec, dst: str, force: bool = False) -> str:
    """The converted Llama-13B written without its 26 GB source: the real `meta-llama`
    converter (converters.meta_llama.convert) runs on a source folder holding params.json,
    tokenizer.model and two placeholder consolidated.NN.pth files, with its .pth reader
    replaced by one that yields, slice by slice, exactly the fp16 values llama_meta writes.
    The canonical tensors are therefore those of synth + convert; only the conversion itself
    (reading 26 GB of .pth) is not exercised, and the disk needs 26 GB instead of 52 GB.
    config.json's `source.files` records the placeholder files' hashes."""
    from converters import meta_llama
    a = spec.arch
    L, D, H, F, V, mp = a["layers"], a["d"], a["heads"], a["ffn"], a["vocab"], a["mp"]
    d = spec.source + "-placeholder"
    _fresh(d)
    with open(os.path.join(d, "params.json"), "w") as f:
        json.dump({"dim": D, "multiple_of": a["multiple_of"], "n_heads": H, "n_layers": L,
                   "norm_eps": 1e-05, "vocab_size": -1}, f)
    shutil.copyfile(os.path.join(TOKENIZERS, "llama", "tokenizer.model"), os.path.join(d, "tokenizer.model"))
    shapes = {"attention.wq.weight": (D, D), "attention.wk.weight": (D, D), "attention.wv.weight": (D, D),
              "attention.wo.weight": (D, D), "feed_forward.w1.weight": (F, D), "feed_forward.w2.weight": (D, F),
              "feed_forward.w3.weight": (F, D), "attention_norm.weight": (D,), "ffn_norm.weight": (D,)}
    full = {"tok_embeddings.weight": ((V, D), 1), "norm.weight": ((D,), None), "output.weight": ((V, D), 0)}
    for i in range(L):
        for k, s in shapes.items():
            full[f"layers.{i}.{k}"] = (s, META_SPLIT[k])
    f16 = np.float16
    parts = {}
    for r in range(mp):
        path = os.path.join(d, f"consolidated.{r:02d}.pth")
        with open(path, "w") as f:
            f.write(f"placeholder: shard {r} of the synthetic {spec.name} (values generated on demand)\n")
        sd = {}
        for name, (shape, dim) in full.items():
            if dim is None:
                sd[name] = _FakeShardTensor(shape, lambda n=name, s=shape: init(n, s, f16))
            else:
                part = list(shape)
                part[dim] //= mp
                sd[name] = _FakeShardTensor(part, lambda n=f"{name}#{r}", s=tuple(part): init(n, s, f16))
        parts[path] = sd
    real = meta_llama.torch_state_dict
    meta_llama.torch_state_dict = lambda path: parts[path]
    try:
        if force and os.path.exists(dst):
            shutil.rmtree(dst)
        return meta_llama.convert(d, dst, force=force)
    finally:
        meta_llama.torch_state_dict = real


def _progress(label):
    state = {"t": time.time()}

    def f(n, total):
        if time.time() - state["t"] > 30 or n == total:
            state["t"] = time.time()
            _log(f"  {label}: {n}/{total} tensors")
    return f


MAKERS = {"gpt2-medium": gpt2, "baevski-wiki103": baevski, "llama-7b": llama_hf, "llama-13b": llama_meta}


def ensure(name: str, force: bool = False) -> str:
    """Generate the source of model `name` unless a complete one exists; returns its path."""
    spec = SPECS[name]
    d = spec.source
    if _done(d) and not force:
        return d
    os.makedirs(os.path.dirname(d), exist_ok=True)
    free = shutil.disk_usage(os.path.dirname(d)).free / 1e9
    need = spec.source_gb + 5
    if free < need:
        raise SystemExit(f"synth: {name} needs ~{spec.source_gb:.0f} GB, only {free:.0f} GB free "
                         f"(keeping {need:.0f} GB); delete other sources first")
    t0 = time.time()
    _log(f"generating {name} in {d}")
    _fresh(d)
    MAKERS[name](spec, d)
    _finish(d, t0)
    _log(f"{name} done in {time.time() - t0:.0f} s")
    return d


def verify(name: str) -> None:
    """Read the source back with refimpl's torch-free readers (and torch, for .pth/.pt)."""
    spec = SPECS[name]
    d = spec.source
    if name in ("baevski-wiki103", "llama-13b"):
        from converters.torch_pickle import load_torch_file
        files = [os.path.join(d, "model.pt")] if name == "baevski-wiki103" else \
            sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".pth"))
        import torch
        for path in files:
            ours = load_torch_file(path)
            sd = ours["model"] if "model" in ours else ours
            theirs = torch.load(path, mmap=True, weights_only=False, map_location="cpu")
            tsd = theirs["model"] if "model" in theirs else theirs
            assert list(sd) == list(tsd), "key order differs"
            for k in list(sd)[:6] + list(sd)[-4:]:
                a = np.asarray(sd[k].numpy())
                b = tsd[k].numpy()
                assert a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b), k
            print(f"{os.path.basename(path)}: {len(sd)} tensors; torch_pickle and torch.load agree")
    else:
        from converters.hf_common import open_weights
        w = open_weights(d)
        print(f"{name}: {len(w.keys())} tensors readable")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=ORDER, help=f"any of {', '.join(ORDER)} (default: all)")
    p.add_argument("--force", action="store_true", help="regenerate even if complete")
    p.add_argument("--verify", action="store_true", help="read the result back (torch_pickle vs torch.load)")
    p.add_argument("--canonical", action="store_true", help="llama-13b only: write the CONVERTED model directly "
                   "(llama_meta_canonical; no 26 GB source) into its canonical directory")
    args = p.parse_args(argv)
    for m in args.models:
        if m not in SPECS:
            p.error(f"unknown model {m!r}")
        if args.canonical:
            if m != "llama-13b":
                p.error("--canonical is for llama-13b")
            t0 = time.time()
            llama_meta_canonical(SPECS[m], SPECS[m].canonical, args.force)
            _log(f"{m}: canonical written directly in {time.time() - t0:.0f} s")
            continue
        ensure(m, args.force)
        if args.verify:
            verify(m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
