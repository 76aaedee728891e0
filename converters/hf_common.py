"""What the Hugging Face converters (hf_gpt2, hf_llama) share.

- `find_weight_files(src)`: the weight files of a HF model directory, in the order HF
  itself prefers them: `model.safetensors`, sharded safetensors with
  `model.safetensors.index.json`, `pytorch_model.bin`, sharded `.bin` with
  `pytorch_model.bin.index.json`.
- `open_weights(src)`: a lazy `{name: tensor}` view over all of them. safetensors are
  memory-mapped (`refimpl.safetensors_io.read_header`); `.bin` files are read by
  `converters.torch_pickle`, which never executes pickle code. Each tensor has `.shape`,
  `.dtype` (safetensors name: "F32", "F16", "BF16", "F64") and `.raw()` (stored bits;
  BF16 as uint16), so converters keep the source precision bit for bit.
- `read_hf_config(src)`: config.json as a dict, with one-line `FormatError`s.
- `hf_tokenizer(...)`: tokenizer.json verbatim, or converted from the family's files.
"""
from __future__ import annotations

import glob
import math
import os

import numpy as np

from refimpl.config import MAX_SIZE, read_json_object, short
from refimpl.files import read_json, read_text
from refimpl.errors import FormatError, RefimplError

from .canonical import Planned, write_canonical

FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")

ST_SINGLE = "model.safetensors"
ST_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


# --- config.json ----------------------------------------------------------------------

def read_hf_config(src: str) -> dict:
    """config.json of a HF model directory, as a dict (FormatError if missing or malformed)."""
    return read_json_object(os.path.join(src, "config.json"),
                            f"{src}: no config.json (a Hugging Face model directory needs one)")


def cfg_int(cfg: dict, key: str, default=None, *, src: str = "config.json") -> int:
    """A positive integer field of config.json (FormatError if missing or not one)."""
    v = cfg.get(key, default)
    if v is None:
        raise FormatError(f"{src}: config.json has no {key!r}")
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_SIZE:
        raise FormatError(f"{src}: config.json {key!r} must be a positive integer up to {MAX_SIZE}, got {short(v)}")
    return v


def cfg_float(cfg: dict, key: str, default=None, *, src: str = "config.json", hi: float | None = None,
              positive: bool = False) -> float:
    """A finite number field of config.json, >= 0 (> 0 when `positive`) and <= `hi` when given."""
    v = cfg.get(key, default)
    if v is None:
        raise FormatError(f"{src}: config.json has no {key!r}")
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and \
        (v > 0 if positive else v >= 0) and (hi is None or v <= hi)
    if not ok:
        what = "a positive" if positive else "a non-negative"
        raise FormatError(f"{src}: config.json {key!r} must be {what} finite number"
                          f"{f' up to {hi:g}' if hi is not None else ''}, got {short(v)}")
    return float(v)


def cfg_bool(cfg: dict, key: str, default: bool, *, src: str = "config.json") -> bool:
    v = cfg.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise FormatError(f"{src}: config.json {key!r} must be true or false, got {short(v)}")
    return v


def token_id(v, vocab: int):
    """A special-token id from config.json (int or list of ints) if inside the vocabulary."""
    if isinstance(v, list):
        v = v[0] if v else None
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab:
        return v
    return None


# --- weight files -----------------------------------------------------------------------

def _index_files(src: str, index_name: str) -> list[str]:
    path = os.path.join(src, index_name)
    doc = read_json(path)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        raise FormatError(f"{path}: invalid shard index (no weight_map object)")
    for k, v in weight_map.items():
        if not isinstance(v, str):
            raise FormatError(f"{path}: invalid shard index: tensor {short(k)} maps to {short(v)}, not a file name")
    names = sorted(set(weight_map.values()))
    if not names:
        raise FormatError(f"{path}: the shard index lists no files")
    out = []
    for n in names:
        if not isinstance(n, str) or os.path.basename(n) != n or n in ("", ".", ".."):
            raise FormatError(f"{path}: shard name {n!r} is not a plain file name")
        p = os.path.join(src, n)
        if not os.path.isfile(p):
            raise FormatError(f"{path}: lists shard {n}, which is missing")
        out.append(p)
    return out


def find_weight_files(src: str) -> tuple[str, list[str], str | None]:
    """(kind "safetensors" or "bin", weight file paths, index path or None) of a HF model dir."""
    if not os.path.isdir(src):
        raise RefimplError(f"{src}: a Hugging Face model is a directory")
    for kind, single, index, pattern in (
            ("safetensors", ST_SINGLE, ST_INDEX, "model-*-of-*.safetensors"),
            ("bin", BIN_SINGLE, BIN_INDEX, "pytorch_model-*-of-*.bin")):
        if os.path.isfile(os.path.join(src, index)):
            return kind, _index_files(src, index), os.path.join(src, index)
        if os.path.isfile(os.path.join(src, single)):
            return kind, [os.path.join(src, single)], None
        shards = sorted(glob.glob(os.path.join(src, pattern)))
        if shards:      # shards without their index: take them all
            return kind, shards, None
    raise FormatError(f"{src}: no weights found (expected {ST_SINGLE}, {ST_INDEX}, {BIN_SINGLE} "
                      f"or {BIN_INDEX})")


def has_weight_files(src: str) -> bool:
    return any(os.path.isfile(os.path.join(src, n)) for n in (ST_SINGLE, ST_INDEX, BIN_SINGLE, BIN_INDEX)) \
        or bool(glob.glob(os.path.join(src, "model-*-of-*.safetensors"))) \
        or bool(glob.glob(os.path.join(src, "pytorch_model-*-of-*.bin")))


def _tensor_like(x) -> bool:
    return all(hasattr(x, a) for a in ("shape", "dtype", "raw"))


def torch_state_dict(path: str) -> dict:
    """The flat {name: LazyTensor} of a torch-saved state dict (never runs pickle code)."""
    try:
        from .torch_pickle import load_torch_file
    except ImportError as e:   # pragma: no cover - only while torch_pickle is missing
        raise RefimplError(f"{path}: reading .bin/.pth files needs converters.torch_pickle ({e})") from None
    obj = load_torch_file(path)
    if isinstance(obj, dict) and not any(_tensor_like(v) for v in obj.values()):
        for key in ("state_dict", "model", "module"):   # common wrappers around a state dict
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise FormatError(f"{os.path.basename(path)}: does not hold a state dict (got {type(obj).__name__})")
    out = {}
    for k, v in obj.items():
        if _tensor_like(v):
            out[str(k)] = v
        elif v is not None and not isinstance(v, (int, float, str, bool)):
            raise FormatError(f"{os.path.basename(path)}: entry {k!r} is not a tensor")
    return out


def load_file_tensors(path: str) -> dict:
    """{name: tensor} of one weight file (.safetensors by memory map, else a torch file)."""
    if path.endswith(".safetensors"):
        from refimpl.safetensors_io import read_header
        return read_header(path)[0]
    return torch_state_dict(path)


class Weights:
    """Lazy, read-only {name: tensor} over several weight files, with a key prefix removed.

    Tensors expose `.shape`, `.dtype` (safetensors name) and `.raw()` (stored values;
    BF16 as uint16 bits). Nothing is read until `.raw()` is called.
    """

    def __init__(self, tensors: dict, files: list[str], index: str | None, kind: str):
        self.tensors, self.files, self.index, self.kind = tensors, files, index, kind

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str):
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError(f"{self.where()}: tensor {name!r} is missing") from None

    def keys(self):
        return self.tensors.keys()

    def where(self) -> str:
        return os.path.basename(self.files[0]) if len(self.files) == 1 else \
            f"{os.path.dirname(self.files[0]) or '.'} ({len(self.files)} shards)"

    def strip_prefix(self, prefixes: tuple[str, ...], keep: tuple[str, ...] = ()) -> "Weights":
        """Drop the first of `prefixes` that starts some key (e.g. "transformer.", "model.").

        Keys listed in `keep` (e.g. "lm_head.weight") are left as they are.
        """
        for pre in prefixes:
            if any(k.startswith(pre) for k in self.tensors if k not in keep):
                out = {}
                for k, v in self.tensors.items():
                    nk = k[len(pre):] if k.startswith(pre) and k not in keep else k
                    if nk in out:
                        raise FormatError(f"{self.where()}: tensor {nk!r} appears both with and without "
                                          f"the {pre!r} prefix")
                    out[nk] = v
                return Weights(out, self.files, self.index, self.kind)
        return self

    def raw(self, name: str, shape: tuple | None = None) -> np.ndarray:
        """Stored values of `name` (BF16 as uint16 bits), shape-checked."""
        t = self[name]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise FormatError(f"{self.where()}: tensor {name!r} has shape {list(t.shape)}, "
                              f"expected {list(shape)}")
        return t.raw()

    def dtype(self, name: str) -> str:
        dt = self[name].dtype
        if dt not in FLOAT_DTYPES:
            raise FormatError(f"{self.where()}: tensor {name!r} has dtype {dt}; only "
                              f"{', '.join(FLOAT_DTYPES)} weights are supported")
        return dt

    def check_shape(self, name: str, shape: tuple) -> None:
        if tuple(self[name].shape) != tuple(shape):
            raise FormatError(f"{self.where()}: tensor {name!r} has shape {list(self[name].shape)}, "
                              f"expected {list(shape)}")

    def same(self, a: str, b: str, block_bytes: int = 1 << 24) -> bool:
        """Whether two tensors hold bit-identical values (e.g. a tied lm_head), compared in
        blocks of rows so a large embedding is never held twice in memory."""
        ta, tb = self[a], self[b]
        if tuple(ta.shape) != tuple(tb.shape) or ta.dtype != tb.dtype:
            return False
        ra, rb = ta.raw(), tb.raw()
        if ra.ndim == 0:
            return bool(np.array_equal(np.asarray(ra).view(np.uint8), np.asarray(rb).view(np.uint8)))
        row = max(1, ra[:1].nbytes)
        step = max(1, block_bytes // row)
        for i in range(0, ra.shape[0], step):
            x, y = np.asarray(ra[i:i + step]), np.asarray(rb[i:i + step])
            if not np.array_equal(x.view(np.uint8), y.view(np.uint8)):
                return False
        return True

    def check_known(self, known: set[str], ignore=lambda k: False) -> None:
        """FormatError on any tensor the converter would silently drop."""
        extra = sorted(k for k in self.tensors if k not in known and not ignore(k))
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise FormatError(f"{self.where()}: unexpected tensor {extra[0]!r}{more}; this architecture "
                              f"variant is not supported")


def open_weights(src: str) -> Weights:
    kind, files, index = find_weight_files(src)
    tensors: dict = {}
    for path in files:
        for k, v in load_file_tensors(path).items():
            if k in tensors:
                raise FormatError(f"{os.path.basename(path)}: tensor {k!r} is also in another shard")
            tensors[k] = v
    return Weights(tensors, files, index, kind)


# --- planning helpers ---------------------------------------------------------------------

def planned(name: str, shape: tuple, dtype: str, fn):
    """A `Planned` whose load applies `fn` to stored bits (transposes/reshapes only)."""
    return Planned(name, tuple(int(s) for s in shape), dtype, fn)


# --- tokenizer ------------------------------------------------------------------------------

def read_tokenizer_json(path: str) -> str:
    """A tokenizer.json's text, verbatim, after checking `tokenizers` can load it."""
    from refimpl.tokenizer import tokenizer_from_text
    text = read_text(path, "tokenizer")
    tokenizer_from_text(text, path)          # FormatError for anything tokenizers would choke on
    return text


def check_layer_count(w: "Weights", prefix: str, n_layers: int) -> None:
    """config.json's layer count must be what the weights hold (checked before any per-layer work)."""
    found = {k[len(prefix):].split(".", 1)[0] for k in w.keys() if k.startswith(prefix)}
    if n_layers != len(found):
        raise FormatError(f"{w.where()}: config.json says {n_layers} layers but the weights hold {len(found)}")


def tokenizer_vocab_size(text: str) -> int:
    from tokenizers import Tokenizer
    return Tokenizer.from_str(text).get_vocab_size(with_added_tokens=True)


def hf_tokenizer(src: str, family: str, tokenizer: str | None = None) -> tuple[str, dict, list[str]]:
    """(tokenizer.json text, specials, source files) for a HF model directory.

    Order: --tokenizer FILE (tokenizer.json, tokenizer.model, or a GPT-2 vocab.json with
    merges.txt beside it), then SRC/tokenizer.json (copied verbatim), then the family's own
    files (GPT-2: vocab.json + merges.txt; Llama: tokenizer.model).
    """
    from .tokenizers import gpt2_tokenizer_json, llama_tokenizer_json
    if tokenizer:
        base = os.path.basename(tokenizer)
        if tokenizer.endswith(".model"):
            text, specials = llama_tokenizer_json(tokenizer)
            return text, specials, [tokenizer]
        merges = os.path.join(os.path.dirname(os.path.abspath(tokenizer)), "merges.txt")
        if base in ("vocab.json", "encoder.json") and os.path.isfile(merges):
            text, specials = gpt2_tokenizer_json(tokenizer, merges)
            return text, specials, [tokenizer, merges]
        return read_tokenizer_json(tokenizer), {}, [tokenizer]
    tj = os.path.join(src, "tokenizer.json")
    if os.path.isfile(tj):
        return read_tokenizer_json(tj), {}, [tj]
    if family == "gpt2":
        vocab, merges = os.path.join(src, "vocab.json"), os.path.join(src, "merges.txt")
        if os.path.isfile(vocab) and os.path.isfile(merges):
            text, specials = gpt2_tokenizer_json(vocab, merges)
            return text, specials, [vocab, merges]
        want = "tokenizer.json or vocab.json + merges.txt"
    else:
        model = os.path.join(src, "tokenizer.model")
        if os.path.isfile(model):
            text, specials = llama_tokenizer_json(model)
            return text, specials, [model]
        want = "tokenizer.json or tokenizer.model"
    raise RefimplError(f"{src}: no tokenizer found ({want}); pass --tokenizer FILE")


def special_tokens(hf_cfg: dict, specials: dict, vocab: int) -> dict:
    """bos/eos/pad/unk ids: config.json's `*_token_id` where inside the vocabulary, else the
    tokenizer's own."""
    out = {}
    for k in ("bos", "eos", "pad", "unk"):
        v = token_id(hf_cfg.get(f"{k}_token_id"), vocab)
        if v is None:
            v = token_id(specials.get(k), vocab)
        if v is not None:
            out[k] = v
    return out


def check_tokenizer_fits(text: str, vocab: int, where: str) -> None:
    n = tokenizer_vocab_size(text)
    if n > vocab:
        raise FormatError(f"{where}: the tokenizer has {n} tokens but the model's vocabulary is {vocab}")


def detect_hf(src: str, model_type: str) -> bool:
    """Cheap: a directory whose config.json names `model_type`. A directory with HF weight
    files but an unreadable config.json is claimed too, so the user gets the config error."""
    if not os.path.isdir(src):
        return False
    path = os.path.join(src, "config.json")
    try:
        cfg = read_json(path)
    except RefimplError:
        cfg = None
    if not isinstance(cfg, dict):
        return has_weight_files(src) and not os.path.exists(os.path.join(src, "params.json"))
    return cfg.get("model_type") == model_type


def finish(src: str, dst: str, hf: dict, cfg: dict, w: "Weights", add, plan: list, embed_key: str,
           family: str, fmt: str, tokenizer: str | None, force: bool) -> str:
    """The part every HF converter ends with: the (un)tied unembedding (an lm_head that differs
    from the embedding is written as unembed.W_U), the tokenizer, special tokens, and writing."""
    V, d = cfg["d_vocab"], cfg["d_model"]
    if "lm_head.weight" in w:
        w.check_shape("lm_head.weight", (V, d))
        tied = w.same("lm_head.weight", embed_key)
    elif cfg["tie_word_embeddings"]:
        tied = True
    else:
        raise FormatError(f"{w.where()}: tie_word_embeddings is false but there is no lm_head.weight")
    cfg["tie_word_embeddings"] = tied
    if not tied:
        add("unembed.W_U", "lm_head.weight", (V, d), (d, V), lambda a: a.T)
    tok_json, specials, tok_files = hf_tokenizer(src, family, tokenizer)
    check_tokenizer_fits(tok_json, V, src)
    cfg["special_tokens"] = special_tokens(hf, specials, V)
    sources = [os.path.join(src, "config.json")] + ([w.index] if w.index else []) + list(w.files) + tok_files
    return write_canonical(dst, cfg, plan, tok_json, sources=sources, source_format=fmt, force=force,
                           inputs=[src])
