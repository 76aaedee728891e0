"""fairseq `transformer_lm` checkpoints (Baevski & Auli adaptive-input LMs) to the canonical format.

A model directory holds `model.pt` (any single `*.pt` is accepted; a `.pt` file may be given
directly) and fairseq's `dict.txt` beside it. The checkpoint is read with the torch-free
`converters.torch_pickle` (zip or legacy serialisation; never executed).

Configuration (`args` Namespace, omegaconf `cfg` or `cfg` dict; fairseq's renames and
architecture defaults; the option refusals) is read and validated by
`converters/fairseq_config.py`, which hands this module a normalised architecture dict.
This module detects checkpoints, maps the state dict to canonical weights, builds the
tokenizer from dict.txt and writes the result.

Semantics (fairseq 0.12 source, confirmed by tests/fixtures/fairseq_tiny/README.md):
- AdaptiveInput band c: `embeddings.c.0.weight` [n_c, d_c] then `embeddings.c.1.weight`
  [d, d_c] (an nn.Linear(d_c, d)): canonical `embed.adaptive.c.W_E` and `W_proj` = its transpose.
  d_c = int(decoder_input_dim // factor**c); cutoffs get len(dict) appended. Every band,
  band 0 included, has its projection. Embeddings are scaled by sqrt(d) (unless
  `no_scale_embedding`); positions are added unscaled.
- Positions: sinusoidal (not stored; sines then cosines, first token at row padding_idx+1)
  or learned (`embed_positions.weight` [max + padding_idx + 1, d]; rows from padding_idx+1
  become `pos_embed.W_pos`).
- Layers are pre-norm: `self_attn_layer_norm` = ln1, `final_layer_norm` = the pre-FFN
  norm ln2. Attention is q/k/v_proj (or the fused `in_proj_weight`/`in_proj_bias` of
  fairseq <= 0.8, rows [q; k; v]) + out_proj, all with biases; fairseq scales q by dh**-0.5
  after the bias, the same as refimpl's scores / sqrt(dh). FFN: fc1, act, fc2.
- Final `decoder.layer_norm` only when normalize_before, not no_decoder_final_norm and
  `decoder.version` > 2 (fairseq drops it for version <= 2 or a missing version).
- AdaptiveSoftmax, tied (`tie_adaptive_weights`): head word logits x @ E_0^T (the band-0
  embedding itself, NOT its projection), cluster logits x @ class_proj^T; tail c:
  (x @ P_c) @ E_c^T with P_c = the adaptive-input projection (`tie_adaptive_proj`) or its own
  nn.Linear(d, d_c). The state dict repeats tied tensors under the softmax names; they are
  checked bit for bit and stored once (else stored separately and the tie flag is false).
  Untied: `head.weight` [n_0 + clusters, d] and tails nn.Linear(d, d_c), nn.Linear(d_c, n_c).
- Plain (non-adaptive) output: `output_projection.weight` (or the old `embed_out`) [V, d],
  tied to `embed_tokens.weight` with `share_decoder_input_output_embed`.

Activations: relu; gelu (exact erf GELU; fairseq itself evaluates it in float32, so a
float64 fairseq run differs from refimpl by ~1e-7 there); gelu_accurate / gelu_fast (tanh:
canonical gelu_new).

Refused, with a one-line error: other architectures (lstm_lm, fconv_lm, megatron, ...),
post-norm (`decoder_normalize_before=False` on the dataclass `transformer_lm`), other
activations, character embeddings, `layernorm_embedding`, no positions, NormFormer
(`scale_*`), `cross_self_attention`, BASE layers, xformers attention, pruned layers,
project_in/out_dim (input/output dim != embed dim with plain embeddings), quant-noise on
plain embeddings, a truncated output dictionary, and any state-dict key not accounted for.

Vocabulary: fairseq's Dictionary (4 specials <s>=0, <pad>=1, </s>=2, <unk>=3, then dict.txt).
If the weights have 1..7 more rows than the dictionary (fairseq-preprocess pads to a multiple
of 8 with `madeupwordNNNN` symbols), those names are added so ids line up.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import warnings

from refimpl.config import short
from refimpl.errors import FormatError, RefimplError

from .canonical import write_canonical
from .common import bias_to_heads, linear_to_heads, out_to_heads
from .fairseq_config import architecture, read_options
from .hf_common import Weights, planned, read_tokenizer_json, tokenizer_vocab_size

FORMAT = "fairseq"
PAD, SPECIALS = 1, {"bos": 0, "pad": 1, "eos": 2, "unk": 3}

PREFIX = "decoder."
AS = "decoder.adaptive_softmax."


# --- finding and detecting ------------------------------------------------------------------

def _checkpoint_file(src: str) -> str:
    if os.path.isfile(src):
        return src
    if not os.path.isdir(src):
        raise RefimplError(f"{src}: no such file or directory")
    p = os.path.join(src, "model.pt")
    if os.path.isfile(p):
        return p
    cands = sorted(glob.glob(os.path.join(src, "*.pt")))
    if len(cands) != 1:
        raise RefimplError(f"{src}: expected model.pt (or exactly one *.pt checkpoint), found {len(cands)} .pt files")
    return cands[0]


def _looks_fairseq(obj) -> bool:
    """A fairseq checkpoint: {'model': state dict with decoder.* keys, 'args'/'cfg', ...}."""
    if not isinstance(obj, dict):
        return False
    sd = obj.get("model")
    return isinstance(sd, dict) and any(isinstance(k, str) and k.startswith(PREFIX) for k in sd)


def detect(src: str) -> bool:
    """A `.pt` checkpoint (or a directory with model.pt / one *.pt) whose pickle is a fairseq
    model: a top-level dict with a `model` state dict of `decoder.*` keys. Reads the pickle
    only (tensors stay on disk). dict.txt is not required here, so that a missing dictionary
    gives its own error at conversion."""
    try:
        path = _checkpoint_file(src)
    except RefimplError:
        return False
    if not path.endswith(".pt"):
        return False
    from .torch_pickle import load_torch_file
    try:
        return _looks_fairseq(load_torch_file(path))
    except (RefimplError, OSError, RecursionError, MemoryError):
        return False


# --- state dict -----------------------------------------------------------------------------

IGNORED = re.compile(r"(.*\._float_tensor|decoder\.version|decoder\.adaptive_softmax\.version)$")
OLD_LN = {"0": "self_attn_layer_norm", "1": "encoder_attn_layer_norm", "2": "final_layer_norm"}
OLD_LN_RE = re.compile(r"(decoder\.layers\.\d+\.)layer_norms\.(\d)\.(weight|bias)$")


def _state_dict(sd: dict, path: str) -> Weights:
    label = os.path.basename(path)
    tensors = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise FormatError(f"{label}: state-dict key {short(k, 40)} is not a string")
        if not all(hasattr(v, a) for a in ("shape", "dtype", "raw")):
            raise FormatError(f"{label}: state-dict entry {k!r} is a {type(v).__name__}, not a tensor")
        m = OLD_LN_RE.match(k)          # fairseq's upgrade of 2018 layer_norms.{0,1,2}
        if m:
            k = f"{m.group(1)}{OLD_LN[m.group(2)]}.{m.group(3)}" if m.group(2) in OLD_LN else k
        if k in tensors:
            raise FormatError(f"{label}: state-dict key {k!r} appears twice (old and new names)")
        tensors[k] = v
    return Weights(tensors, [path], None, "bin")


class _Plan:
    def __init__(self, sd: Weights):
        self.sd, self.items, self.used = sd, [], set()

    def add(self, name: str, key: str, key_shape: tuple, shape: tuple, fn=lambda a: a):
        sd = self.sd
        sd.check_shape(key, key_shape)
        self.used.add(key)
        self.items.append(planned(name, shape, sd.dtype(key), lambda: fn(sd.raw(key))))

    def tied(self, dup: str, orig: str, shape: tuple) -> bool:
        """Whether a tied duplicate under the softmax name equals the original bit for bit
        (absent counts as tied: fairseq would rebuild it from the original)."""
        self.used.add(dup)
        if dup not in self.sd:
            return True
        self.sd.check_shape(dup, shape)
        return self.sd.same(dup, orig)


def _bands(cut: list[int], V: int) -> list[tuple[int, int]]:
    full = cut + [V] if V > cut[-1] else list(cut)
    return [(0 if c == 0 else full[c - 1], full[c]) for c in range(len(full))]


def _vocab_size(a: dict, sd: Weights) -> int:
    if a["adaptive_in"]:
        n, c = 0, 0
        while f"decoder.embed_tokens.embeddings.{c}.0.weight" in sd:
            n += sd[f"decoder.embed_tokens.embeddings.{c}.0.weight"].shape[0]
            c += 1
        if c == 0:
            raise FormatError(f"{sd.where()}: adaptive_input=True but there is no "
                              f"decoder.embed_tokens.embeddings.0.0.weight")
        return n
    if "decoder.embed_tokens.weight" not in sd:
        raise FormatError(f"{sd.where()}: no decoder.embed_tokens.weight (and adaptive_input is off)")
    return int(sd["decoder.embed_tokens.weight"].shape[0])


def band_widths(d: int, factor: float, n: int, what: str) -> list[int]:
    """fairseq's band widths int(d // factor**c), c = 0..n-1, computed so that no factor a
    checkpoint claims can divide by zero, overflow or give a width outside 1 .. d * 2^16."""
    dims = []
    for c in range(n):
        try:
            den = factor ** c
            w = d // den if den > 0 else math.inf
        except (OverflowError, ZeroDivisionError):
            w = math.inf
        if not (math.isfinite(w) and 1 <= w <= d << 16):
            raise FormatError(f"{what} are not all positive integers of a sane size (band {c}: {w:g})")
        dims.append(int(w))
    return dims


def _plan(a: dict, sd: Weights, V: int) -> tuple[list, dict]:
    d, H, F, L = a["d"], a["H"], a["F"], a["L"]
    dh = d // H
    P = _Plan(sd)
    cfg_adaptive = None
    where = sd.where()

    # -- embeddings
    if a["adaptive_in"]:
        bands = _bands(a["in_cut"], V)
        dims = band_widths(a["d_in"], a["in_factor"], len(bands), f"{where}: adaptive input band widths "
                           f"(decoder_input_dim {a['d_in']}, adaptive_input_factor {a['in_factor']:g})")
        for c, ((lo, hi), dc) in enumerate(zip(bands, dims)):
            e = f"decoder.embed_tokens.embeddings.{c}."
            P.add(f"embed.adaptive.{c}.W_E", e + "0.weight", (hi - lo, dc), (hi - lo, dc))
            P.add(f"embed.adaptive.{c}.W_proj", e + "1.weight", (d, dc), (dc, d), lambda x: x.T)
        cfg_adaptive = dict(cutoffs=[hi for _, hi in bands], dims=dims, tie_weights=False, tie_proj=False)
    else:
        P.add("embed.W_E", "decoder.embed_tokens.weight", (V, d), (V, d))
    if not a["learned_pos"] and d < 4:
        raise FormatError(f"{where}: sinusoidal positions need decoder_embed_dim >= 4 (fairseq's formula divides "
                          f"by d/2 - 1), got {d}")
    if a["learned_pos"]:
        key = "decoder.embed_positions.weight"
        if key not in sd:
            raise FormatError(f"{where}: decoder_learned_pos=True but there is no {key}")
        rows = sd[key].shape[0]
        if rows != a["n_ctx"] + PAD + 1:
            raise FormatError(f"{where}: {key} has {rows} rows; max_target_positions {a['n_ctx']} "
                              f"implies {a['n_ctx'] + PAD + 1}")
        # fairseq's first position uses row padding_idx + 1; the canonical table starts at row 0
        P.add("pos_embed.W_pos", key, (rows, d), (a["n_ctx"], d), lambda x: x[PAD + 1:])

    # -- blocks
    fused = []
    for i in range(L):
        p, b = f"decoder.layers.{i}.", f"blocks.{i}."
        P.add(b + "ln1.w", p + "self_attn_layer_norm.weight", (d,), (d,))
        P.add(b + "ln1.b", p + "self_attn_layer_norm.bias", (d,), (d,))
        s = p + "self_attn."
        if s + "in_proj_weight" in sd:      # fairseq <= 0.8: rows [q; k; v]
            fused.append(i)
            for j, m in enumerate("QKV"):
                P.add(b + f"attn.W_{m}", s + "in_proj_weight", (3 * d, d), (H, d, dh),
                      lambda x, j=j: linear_to_heads(x[j * d:(j + 1) * d], H))
                P.add(b + f"attn.b_{m}", s + "in_proj_bias", (3 * d,), (H, dh),
                      lambda x, j=j: bias_to_heads(x[j * d:(j + 1) * d], H))
        else:
            for m in "QKV":
                n = s + f"{m.lower()}_proj."
                P.add(b + f"attn.W_{m}", n + "weight", (d, d), (H, d, dh), lambda x: linear_to_heads(x, H))
                P.add(b + f"attn.b_{m}", n + "bias", (d,), (H, dh), lambda x: bias_to_heads(x, H))
        P.add(b + "attn.W_O", s + "out_proj.weight", (d, d), (H, dh, d), lambda x: out_to_heads(x, H))
        P.add(b + "attn.b_O", s + "out_proj.bias", (d,), (d,))
        P.add(b + "ln2.w", p + "final_layer_norm.weight", (d,), (d,))     # the PRE-FFN norm
        P.add(b + "ln2.b", p + "final_layer_norm.bias", (d,), (d,))
        P.add(b + "mlp.W_in", p + "fc1.weight", (F, d), (d, F), lambda x: x.T)
        P.add(b + "mlp.b_in", p + "fc1.bias", (F,), (F,))
        P.add(b + "mlp.W_out", p + "fc2.weight", (d, F), (F, d), lambda x: x.T)
        P.add(b + "mlp.b_out", p + "fc2.bias", (d,), (d,))
    if a["final_norm"]:
        P.add("ln_final.w", "decoder.layer_norm.weight", (d,), (d,))
        P.add("ln_final.b", "decoder.layer_norm.bias", (d,), (d,))

    # -- output
    tie_word = False
    if a["soft_cut"] is not None:
        bands = _bands(a["soft_cut"], V)
        if a["adaptive_in"] and [hi for _, hi in bands] != cfg_adaptive["cutoffs"]:
            raise FormatError(f"{where}: adaptive_softmax_cutoff {a['soft_cut']} differs from "
                              f"adaptive_input_cutoff {a['in_cut']}; not supported")
        n0, ncls = bands[0][1], len(bands) - 1
        if ncls < 1:
            raise FormatError(f"{where}: adaptive softmax with a single band is not supported")
        P.add("unembed.adaptive.head.W_cls", AS + "head.class_proj.weight" if a["tie_adaptive"] else AS + "head.weight",
              (ncls, d) if a["tie_adaptive"] else (n0 + ncls, d), (d, ncls),
              (lambda x: x.T) if a["tie_adaptive"] else (lambda x: x[n0:].T))
        if a["tie_adaptive"]:
            dims = cfg_adaptive["dims"]
            if dims[0] != d:
                raise FormatError(f"{where}: tied adaptive softmax with band-0 width {dims[0]} != {d} "
                                  f"is not supported")
            E = "decoder.embed_tokens.embeddings.{}.{}.weight"
            tie_w = P.tied(AS + "head.word_proj.weight", E.format(0, 0), (n0, dims[0]))
            tie_p = a["tie_proj"]
            for c in range(1, len(bands)):
                n_c = bands[c][1] - bands[c][0]
                tie_w &= P.tied(AS + f"tail.{c - 1}.2.weight", E.format(c, 0), (n_c, dims[c]))
                if a["tie_proj"]:
                    tie_p &= P.tied(AS + f"tail.{c - 1}.0.weight", E.format(c, 1), (d, dims[c]))
            cfg_adaptive.update(tie_weights=bool(tie_w), tie_proj=bool(tie_p))
            if not tie_w:       # a duplicate that differs: keep every softmax table as its own tensor
                for c, (lo, hi) in enumerate(bands):
                    key = AS + "head.word_proj.weight" if c == 0 else AS + f"tail.{c - 1}.2.weight"
                    if key not in sd:
                        key = E.format(c, 0)
                    P.add(f"unembed.adaptive.{c}.W_U", key, (hi - lo, dims[c]), (dims[c], hi - lo), lambda x: x.T)
            if not tie_p:
                for c in range(1, len(bands)):
                    key = AS + f"tail.{c - 1}.0.weight"
                    if a["tie_proj"]:     # TiedLinear(P, transpose=True): stored as P [d, d_c]
                        P.add(f"unembed.adaptive.{c}.W_proj", key if key in sd else E.format(c, 1),
                              (d, dims[c]), (d, dims[c]))
                    else:                 # nn.Linear(d, d_c): [d_c, d]
                        P.add(f"unembed.adaptive.{c}.W_proj", key, (dims[c], d), (d, dims[c]), lambda x: x.T)
        else:
            dims = band_widths(d, a["soft_factor"], len(bands), f"{where}: adaptive softmax band widths "
                               f"(decoder_embed_dim {d}, adaptive_softmax_factor {a['soft_factor']:g})")
            if cfg_adaptive is not None and cfg_adaptive["dims"] != dims:
                raise FormatError(f"{where}: adaptive input widths {cfg_adaptive['dims']} differ from the "
                                  f"adaptive softmax widths {dims}; not supported")
            P.add("unembed.adaptive.0.W_U", AS + "head.weight", (n0 + ncls, d), (d, n0), lambda x: x[:n0].T)
            for c in range(1, len(bands)):
                n_c = bands[c][1] - bands[c][0]
                P.add(f"unembed.adaptive.{c}.W_proj", AS + f"tail.{c - 1}.0.weight", (dims[c], d), (d, dims[c]),
                      lambda x: x.T)
                P.add(f"unembed.adaptive.{c}.W_U", AS + f"tail.{c - 1}.2.weight", (n_c, dims[c]), (dims[c], n_c),
                      lambda x: x.T)
            cfg_adaptive = cfg_adaptive or dict(cutoffs=[hi for _, hi in bands], dims=dims)
            cfg_adaptive.update(tie_weights=False, tie_proj=False)
    else:
        out = "decoder.output_projection.weight"
        if out not in sd and "decoder.embed_out" in sd:      # fairseq < 0.10 name
            out = "decoder.embed_out"
        if a["share"]:
            tie_word = P.tied(out, "decoder.embed_tokens.weight", (V, d))
            if not tie_word:
                P.add("unembed.W_U", out, (V, d), (d, V), lambda x: x.T)
        else:
            if out not in sd:
                raise FormatError(f"{where}: no decoder.output_projection.weight (or embed_out)")
            P.add("unembed.W_U", out, (V, d), (d, V), lambda x: x.T)

    ignore_pos = (lambda k: k == "decoder.embed_positions.weights") if not a["learned_pos"] else (lambda k: False)
    sd.check_known(P.used, ignore=lambda k: bool(IGNORED.match(k)) or ignore_pos(k))
    return P.items, dict(adaptive=cfg_adaptive, tie_word_embeddings=tie_word, fused_qkv_layers=fused)


# --- tokenizer ----------------------------------------------------------------------------------

def _dict_file(ckpt: str, tokenizer: str | None) -> str:
    if tokenizer:
        return tokenizer
    p = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "dict.txt")
    if not os.path.isfile(p):
        raise RefimplError(f"{os.path.dirname(os.path.abspath(ckpt))}: no dict.txt beside "
                           f"{os.path.basename(ckpt)} (the fairseq dictionary); pass --tokenizer FILE")
    return p


def madeupwords(n: int) -> list[str]:
    """The names fairseq's Dictionary.finalize(padding_factor) pads the vocabulary with."""
    return ["madeupword{:04d}".format(i) for i in range(n)]


def _tokenizer(path: str, V: int) -> tuple[str, int]:
    """(tokenizer.json text, number of madeupword symbols added)."""
    if path.endswith(".json"):
        text = read_tokenizer_json(path)
        n = tokenizer_vocab_size(text)
        if n > V:
            raise FormatError(f"{path}: the tokenizer has {n} tokens but the model's vocabulary is {V}")
        return text, 0
    from .tokenizers import fairseq_dict_tokenizer_json
    text, _ = fairseq_dict_tokenizer_json(path)
    n = tokenizer_vocab_size(text)
    if n == V:
        return text, 0
    if not 0 < V - n < 8:
        raise FormatError(f"{path}: the dictionary has {n} symbols (with fairseq's 4 specials) but the "
                          f"model's vocabulary is {V}")
    tok = json.loads(text)
    vocab = tok["model"]["vocab"]
    for i, w in enumerate(madeupwords(V - n)):
        if w in vocab:
            raise FormatError(f"{path}: cannot pad the dictionary to {V} symbols: {w!r} is already a word")
        vocab[w] = n + i
    return json.dumps(tok, ensure_ascii=False), V - n


# --- convert ------------------------------------------------------------------------------------

def convert(src: str, dst: str, force: bool = False, tokenizer: str | None = None) -> str:
    from .torch_pickle import load_torch_file
    path = _checkpoint_file(src)
    label = os.path.basename(path)
    tok_path = _dict_file(path, tokenizer)
    obj = load_torch_file(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise FormatError(f"{label}: not a fairseq checkpoint (no 'model' state dict at the top level)")
    opts = read_options(obj, label)
    sd = _state_dict(obj["model"], path)
    a = architecture(opts, sd)
    V = _vocab_size(a, sd)
    plan, got = _plan(a, sd, V)
    tok_json, n_made = _tokenizer(tok_path, V)
    if n_made:
        warnings.warn(f"{tok_path}: dictionary padded with {n_made} madeupword symbols to the model's "
                      f"{V} rows (fairseq-preprocess pads to a multiple of 8)", stacklevel=2)
    d, H = a["d"], a["H"]
    cfg = dict(family="fairseq_lm", d_model=d, n_layers=a["L"], n_heads=H, n_kv_heads=H, d_head=d // H,
               d_ff=a["F"], d_vocab=V, n_ctx=a["n_ctx"], norm="layernorm", norm_eps=1e-5,
               final_norm=a["final_norm"], act=a["act"], gated_ffn=False,
               positions="learned" if a["learned_pos"] else "sinusoidal", padding_idx=PAD,
               embed_scale=a["embed_scale"],
               embedding="adaptive" if a["adaptive_in"] else "linear",
               unembedding="adaptive" if a["soft_cut"] is not None else "linear",
               tie_word_embeddings=got["tie_word_embeddings"], adaptive=got["adaptive"],
               attn_bias=True, mlp_bias=True, prepend_ids=a["prepend"], special_tokens=dict(SPECIALS))
    cfg["fairseq"] = dict(arch=a["arch"], options=opts.kind, decoder_version=a["version"],
                          activation_fn=a["fairseq_act"], fused_qkv_layers=got["fused_qkv_layers"],
                          madeupwords=n_made)
    return write_canonical(dst, cfg, plan, tok_json, sources=[path, tok_path], source_format=FORMAT, force=force,
                           inputs=[src])
