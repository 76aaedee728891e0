"""llama2.c checkpoints (karpathy/llama2.c `export.py`) to the canonical format.

Two float32 layouts:
- legacy (v0): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
  seq_len; a negative vocab_size means an unshared classifier), then token embedding,
  attention norms, wq, wk, wv, wo, FFN norms, w1, w2, w3, final norm, the RoPE tables
  freq_cis_real/imag [seq_len, head_size/2] (dropped), and wcls if unshared.
- v1: uint32 magic "ak42", int32 version 1, the same 7 int32, uint8 shared_classifier,
  zero padding to 256 bytes; then attention norms, FFN norms, final norm, token
  embedding, wq, wk, wv, wo, w1, w2, w3 (, wcls).
Weights are [out, in] per layer; q/k rows use interleaved RoPE pairs and are permuted
to the canonical half-split convention. RMSNorm eps is llama2.c's 1e-5.
"""
from __future__ import annotations

import glob
import math
import os
import struct

import numpy as np

from refimpl.errors import FormatError, RefimplError
from refimpl.files import open_regular

from .canonical import Planned, write_canonical
from .common import interleaved_to_half, linear_to_heads, out_to_heads

MAGIC = 0x616B3432
FORMAT = "llama2c"


def _read_header(path: str) -> tuple[dict, int, bool]:
    """(params, offset of the first weight, is_v1). Raises FormatError on a bad header."""
    name = os.path.basename(path)
    with open_regular(path) as f:
        head = f.read(256)
    if len(head) >= 8 and struct.unpack("<I", head[:4])[0] == MAGIC:
        (version,) = struct.unpack("<i", head[4:8])
        if version != 1:
            raise FormatError(f"{name}: llama2.c format version {version} is not supported "
                              f"(only float32 v0 and v1; v2 is int8-quantised)")
        if len(head) < 37:
            raise FormatError(f"{name}: truncated llama2.c v1 header")
        vals = struct.unpack("<7i", head[8:36])
        shared, offset, v1 = bool(head[36]), 256, True
    else:
        if len(head) < 28:
            raise FormatError(f"{name}: too short for a llama2.c checkpoint header")
        vals = struct.unpack("<7i", head[:28])
        shared, offset, v1 = vals[5] > 0, 28, False
    p = dict(zip(("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"), vals))
    p["vocab_size"] = abs(p["vocab_size"])
    p["shared"] = shared
    if not all(0 < p[k] < 1 << 20 for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
                                            "vocab_size", "seq_len")) \
            or p["dim"] % p["n_heads"] or p["n_heads"] % p["n_kv_heads"] or (p["dim"] // p["n_heads"]) % 2:
        raise FormatError(f"{name}: not a llama2.c checkpoint (implausible header {vals})")
    return p, offset, v1


def _layout(p: dict, v1: bool) -> list[tuple[str, tuple]]:
    """(llama2.c tensor name, shape) in file order."""
    d, F, L, V, hs = p["dim"], p["hidden_dim"], p["n_layers"], p["vocab_size"], p["dim"] // p["n_heads"]
    kv = p["n_kv_heads"] * hs
    att = [("wq", (L, d, d)), ("wk", (L, kv, d)), ("wv", (L, kv, d)), ("wo", (L, d, d))]
    ffn = [("w1", (L, F, d)), ("w2", (L, d, F)), ("w3", (L, F, d))]
    if v1:
        out = [("rms_att", (L, d)), ("rms_ffn", (L, d)), ("rms_final", (d,)), ("emb", (V, d))] + att + ffn
    else:
        out = [("emb", (V, d)), ("rms_att", (L, d))] + att + [("rms_ffn", (L, d))] + ffn + \
              [("rms_final", (d,)), ("freq_real", (p["seq_len"], hs // 2)), ("freq_imag", (p["seq_len"], hs // 2))]
    if not p["shared"]:
        out.append(("wcls", (V, d)))
    return out


def read_llama2c(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Header params and {llama2.c name: float32 memmap}. Validates the file size exactly."""
    p, offset, v1 = _read_header(path)
    layout = _layout(p, v1)
    need = offset + 4 * sum(math.prod(s) for _, s in layout)
    size = os.path.getsize(path)
    if size != need:
        raise FormatError(f"{os.path.basename(path)}: llama2.c file is {size} bytes, header implies {need} "
                          f"({'truncated' if size < need else 'trailing data'})")
    arrays, pos = {}, offset
    for name, shape in layout:
        arrays[name] = np.memmap(path, dtype="<f4", mode="r", offset=pos, shape=shape)
        pos += 4 * math.prod(shape)
    return p, arrays


def detect(src: str) -> bool:
    try:
        model = _model_file(src)
        _read_header(model)
        return True
    except (RefimplError, OSError):
        pass
    # a single .bin file that is not a torch file (zip or pickle) can only be llama2.c: claim it,
    # so that conversion reports what is wrong with its header instead of "unknown format"
    try:
        with open_regular(src) as f:
            magic = f.read(2)
    except (OSError, RefimplError):
        return False
    return os.path.isfile(src) and src.endswith(".bin") and magic != b"PK" and not magic.startswith(b"\x80")


def _model_file(src: str) -> str:
    if os.path.isfile(src):
        return src
    cands = [f for f in sorted(glob.glob(os.path.join(src, "*.bin"))) if not _is_tokenizer_name(f)]
    if len(cands) != 1:
        raise RefimplError(f"{src}: expected exactly one llama2.c model .bin file, found {len(cands)}")
    return cands[0]


def _is_tokenizer_name(f: str) -> bool:
    b = os.path.basename(f)
    return b.startswith("tok") or b == "tokenizer.bin"


def _tokenizer_file(model_path: str, tokenizer: str | None) -> str:
    if tokenizer:
        return tokenizer
    cands = [f for f in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(model_path)), "*.bin")))
             if _is_tokenizer_name(f)]
    if len(cands) != 1:
        raise RefimplError(f"{model_path}: cannot find its llama2.c tokenizer (tokenizer.bin / tok*.bin); "
                           f"pass --tokenizer FILE")
    return cands[0]


def convert(src: str, dst: str, force: bool = False, tokenizer: str | None = None) -> str:
    from .tokenizers import llama2c_tokenizer_json
    path = _model_file(src)
    p, w = read_llama2c(path)
    tok_path = _tokenizer_file(path, tokenizer)
    tok_json, specials = llama2c_tokenizer_json(tok_path, p["vocab_size"])
    H, Hk, d, F, V = p["n_heads"], p["n_kv_heads"], p["dim"], p["hidden_dim"], p["vocab_size"]
    dh = d // H
    cfg = dict(family="llama", d_model=d, n_layers=p["n_layers"], n_heads=H, n_kv_heads=Hk, d_head=dh,
               d_ff=F, d_vocab=V, n_ctx=p["seq_len"], norm="rmsnorm", norm_eps=1e-5, act="silu",
               gated_ffn=True, positions="rope", rope_theta=10000.0, final_norm=True,
               tie_word_embeddings=p["shared"], prepend_ids=[1],
               special_tokens={k: v for k, v in specials.items() if v is not None})
    plan = [Planned("embed.W_E", (V, d), "F32", lambda: w["emb"])]
    for i in range(p["n_layers"]):
        b = f"blocks.{i}."
        plan += [
            Planned(b + "ln1.w", (d,), "F32", lambda i=i: w["rms_att"][i]),
            Planned(b + "attn.W_Q", (H, d, dh), "F32", lambda i=i: linear_to_heads(interleaved_to_half(w["wq"][i], H), H)),
            Planned(b + "attn.W_K", (Hk, d, dh), "F32", lambda i=i: linear_to_heads(interleaved_to_half(w["wk"][i], Hk), Hk)),
            Planned(b + "attn.W_V", (Hk, d, dh), "F32", lambda i=i: linear_to_heads(w["wv"][i], Hk)),
            Planned(b + "attn.W_O", (H, dh, d), "F32", lambda i=i: out_to_heads(w["wo"][i], H)),
            Planned(b + "ln2.w", (d,), "F32", lambda i=i: w["rms_ffn"][i]),
            Planned(b + "mlp.W_gate", (d, F), "F32", lambda i=i: w["w1"][i].T),
            Planned(b + "mlp.W_in", (d, F), "F32", lambda i=i: w["w3"][i].T),
            Planned(b + "mlp.W_out", (F, d), "F32", lambda i=i: w["w2"][i].T),
        ]
    plan.append(Planned("ln_final.w", (d,), "F32", lambda: w["rms_final"]))
    if not p["shared"]:
        plan.append(Planned("unembed.W_U", (d, V), "F32", lambda: w["wcls"].T))
    return write_canonical(dst, cfg, plan, tok_json, sources=[path, tok_path], source_format=FORMAT, force=force,
                           inputs=[src])
