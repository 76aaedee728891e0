"""A converted model on disk: config, memory-mapped tensors, tokenizer.

`load(path, dtype)` reads only the headers. Weights stay memory-mapped in their stored
precision; `Model.weight(name)` upcasts one tensor to the compute dtype when the
forward pass (or an analysis) asks for it. Upcast tensors are kept in a small
least-recently-used cache (`cache_bytes`, default 1 GiB) so repeated runs on a small
model do not re-convert, while a model larger than RAM streams layer by layer.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict

import numpy as np

from .config import Config, read_config
from .errors import FormatError, RefimplError
from .safetensors_io import NUMPY_TO_ST, StoredTensor, read_header

DTYPES = {"float32": np.float32, "float64": np.float64}
PINNED = ("unembed.", "ln_final.")


def _index_tensors(model_dir: str) -> dict[str, StoredTensor]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{index}: invalid shard index ({e})") from None
    elif os.path.exists(single):
        files = ["model.safetensors"]
    else:
        raise FormatError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, StoredTensor] = {}
    for fname in files:
        if os.path.basename(fname) != fname:
            raise FormatError(f"{index}: shard name {fname!r} is not a plain file name")
        t, _ = read_header(os.path.join(model_dir, fname))
        tensors.update(t)
    return tensors


class Model:
    """Weights + config + tokenizer of one canonical model directory."""

    def __init__(self, path: str, cfg: Config, tensors: dict[str, StoredTensor], dtype="float64",
                 cache_bytes: int = 1 << 30):
        if dtype not in DTYPES:
            raise RefimplError(f"dtype must be float32 or float64, got {dtype!r}")
        self.path, self.cfg, self.tensors = path, cfg, tensors
        self.dtype = np.dtype(DTYPES[dtype])
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._scratch: dict[str, np.ndarray] = {}           # per-layer buffers reused by block()
        self._cached = 0
        self._tokenizer = None
        self._check_tensors()
        self.upcast_cache = self._open_upcast_cache()

    def __repr__(self) -> str:
        c = self.cfg
        return (f"Model({os.path.basename(os.path.normpath(self.path))!r}, family={c.family}, n_layers={c.n_layers}, "
                f"d_model={c.d_model}, n_heads={c.n_heads}, d_ff={c.d_ff}, d_vocab={c.d_vocab}, "
                f"dtype={self.dtype.name}, path={self.path!r})")

    # -- the prepared weight cache ---------------------------------------------------------
    def upcast_cache_path(self) -> str:
        from .bounds import cache_dir
        return os.path.join(cache_dir(self), f"weights-{self.dtype.name}-{self.fingerprint()[:16]}.safetensors")

    def fingerprint(self) -> str:
        """sha256 over the recorded weight-file hashes (or the path when nothing is recorded)."""
        import hashlib
        files = self.cfg.extra.get("files") or {"path": os.path.abspath(self.path)}
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()

    def needs_upcast(self) -> bool:
        """Whether any stored tensor differs from the compute dtype (and so has to be widened)."""
        return any(t.dtype != NUMPY_TO_ST[self.dtype] for t in self.tensors.values())

    def _open_upcast_cache(self):
        """The weights in the compute dtype, if `refimpl prepare` wrote them (else None)."""
        if not self.needs_upcast():
            return None                                   # nothing to convert anyway
        path = self.upcast_cache_path()
        if not os.path.exists(path):
            return None
        try:
            tensors, meta = read_header(path)
        except FormatError:
            return None                                   # a damaged cache is ignored, never trusted
        ok = meta.get("fingerprint") == self.fingerprint() and all(
            n in tensors and tuple(tensors[n].shape) == tuple(t.shape) for n, t in self.tensors.items())
        return tensors if ok else None

    def write_upcast_cache(self) -> str:
        """Write every tensor in the compute dtype next to the model (exact: widening only)."""
        import tempfile
        from .safetensors_io import write_safetensors
        path = self.upcast_cache_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        st = NUMPY_TO_ST[self.dtype]
        names = sorted(self.tensors)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.close(fd)
        try:
            write_safetensors(tmp, [(n, self.tensors[n].shape, st) for n in names],
                              ((n, np.asarray(self.tensors[n].numpy(), self.dtype)) for n in names),
                              {"fingerprint": self.fingerprint()})
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        self.upcast_cache = self._open_upcast_cache()
        return path

    # -- tensors -------------------------------------------------------------------
    def _resolve(self, name: str) -> tuple[str, bool]:
        """Map a canonical name to (stored name, transpose?) following the ties of docs/format.md."""
        cfg = self.cfg
        if name == "unembed.W_U" and cfg.tie_word_embeddings:
            return "embed.W_E", True
        if name.startswith("unembed.adaptive.") and cfg.adaptive:
            _, _, band, what = name.split(".")
            if band != "head":
                if what == "W_U" and cfg.adaptive.get("tie_weights"):
                    return f"embed.adaptive.{band}.W_E", True
                if what == "W_proj" and band != "0" and cfg.adaptive.get("tie_proj"):
                    return f"embed.adaptive.{band}.W_proj", True
        return name, False

    def has(self, name: str) -> bool:
        return self._resolve(name)[0] in self.tensors

    def stored(self, name: str) -> np.ndarray:
        """The stored values (memory map, stored precision; bf16 widened), ties resolved."""
        src, transpose = self._resolve(name)
        if src not in self.tensors:
            raise FormatError(f"{self.path}: tensor {src!r} is missing")
        a = self.tensors[src].numpy()
        return a.T if transpose else a

    def weight(self, name: str) -> np.ndarray:
        """One tensor in the compute dtype (upcast on first use, then cached).

        Served without any conversion when the stored dtype already is the compute dtype, or
        from the prepared weight cache (`refimpl prepare`: an exact copy in the compute dtype)."""
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        src, transpose = self._resolve(name)
        if self.upcast_cache is not None and src in self.upcast_cache:
            a = self.upcast_cache[src].raw()
            return a.T if transpose else a
        a = self._upcast(src)
        a = a.T if transpose else a
        if name.startswith(PINNED):                 # the readout is used by every analysis: always kept
            self._cache[name] = a
            return a
        if a.nbytes <= self.cache_bytes:
            self._cache[name] = a
            self._cached += a.nbytes
            for key in [k for k in self._cache if not k.startswith(PINNED)]:
                if self._cached <= self.cache_bytes:
                    break
                self._cached -= self._cache.pop(key).nbytes
        return a

    def _upcast(self, src: str, out: np.ndarray | None = None) -> np.ndarray:
        """Stored tensor `src` in the compute dtype: a view when no conversion is needed, else an
        exact threaded widening into `out` (a reused buffer) or a new array."""
        st = self.tensors[src]
        if st.dtype == NUMPY_TO_ST[self.dtype]:
            return np.asarray(st.raw(), self.dtype)
        if out is None or out.shape != tuple(st.shape):
            out = np.empty(st.shape, self.dtype)
        return st.cast_into(out)

    def rows(self, name: str, idx) -> np.ndarray:
        """Rows `idx` of a tensor in the compute dtype (a copy), without converting the whole tensor."""
        return self._take(name, (idx,))

    def columns(self, name: str, idx) -> np.ndarray:
        """Columns `idx` of a 2-d tensor in the compute dtype (a copy), without converting the whole tensor."""
        return self._take(name, (slice(None), idx))

    def _take(self, name: str, index: tuple) -> np.ndarray:
        # a copy, never a view: a view would keep a whole upcast tensor alive
        if name in self._cache:
            return np.array(self._cache[name][index])
        src, transpose = self._resolve(name)
        if transpose:
            return self.tensors[src].take(index[::-1], self.dtype).T if len(index) == 2 else \
                np.array(self.weight(name)[index])
        if self.upcast_cache is not None and src in self.upcast_cache:
            return np.array(self.upcast_cache[src].raw()[index])
        return self.tensors[src].take(index, self.dtype)

    def weight_or_zeros(self, name: str, shape: tuple) -> np.ndarray:
        return self.weight(name) if self.has(name) else np.zeros(shape, self.dtype)

    def block(self, i: int) -> dict[str, np.ndarray]:
        """All weights of block i in the compute dtype, keyed by the part after `blocks.{i}.`."""
        if not 0 <= i < self.cfg.n_layers:
            raise RefimplError(f"layer {i} out of range (model has {self.cfg.n_layers} layers)")
        prefix = f"blocks.{i}."
        names = [n for n in self.tensors if n.startswith(prefix)]
        if self._fits_cache() or self.upcast_cache is not None:
            return {n[len(prefix):]: self.weight(n) for n in names}
        # a model larger than the cache streams: every layer is widened into the same buffers,
        # so a forward pass allocates (and page-faults) one layer's worth of memory, not L
        out = {}
        for n in names:
            key = n[len(prefix):]
            if n in self._cache:
                out[key] = self.weight(n)
            else:
                out[key] = self._scratch[key] = self._upcast(n, self._scratch.get(key))
        return out

    def _fits_cache(self) -> bool:
        if getattr(self, "_n_elements", None) is None:
            self._n_elements = sum(math.prod(t.shape) for t in self.tensors.values())
        return self._n_elements * self.dtype.itemsize <= self.cache_bytes

    def _check_tensors(self) -> None:
        """Every tensor the forward pass reads exists (or is optional) with the shape the config implies."""
        c = self.cfg
        H, Hk, d, dh, F, V = c.n_heads, c.n_kv_heads, c.d_model, c.d_head, c.d_ff, c.d_vocab

        def check(want: dict, optional: dict = {}, layer: int | None = None) -> None:
            for name, shape in {**optional, **want}.items():      # want wins over optional
                src, transpose = self._resolve(name)
                if src not in self.tensors:
                    if name not in want:
                        continue
                    why = (" (config.json has gated_ffn=true)" if name.endswith("mlp.W_gate") else
                           f" (config.json has n_layers={c.n_layers})" if layer is not None and layer > 0 else "")
                    raise FormatError(f"{self.path}: tensor {src!r} is missing{why}")
                got = self.tensors[src].shape[::-1] if transpose else self.tensors[src].shape
                if tuple(got) != shape:
                    raise FormatError(f"{self.path}: tensor {src!r} has shape {list(got)}, but config.json "
                                      f"implies {list(shape)}")

        want, opt = {}, {"ln_final.b": (d,), "unembed.b_U": (V,)}
        if c.embedding == "linear":
            want["embed.W_E"] = (V, d)
        if c.positions == "learned":
            want["pos_embed.W_pos"] = (c.n_ctx, d)
        if c.unembedding == "linear":
            want["unembed.W_U"] = (d, V)
        if c.final_norm:
            want["ln_final.w"] = (d,)
        if "adaptive" in (c.embedding, c.unembedding):
            dims, bands = c.adaptive["dims"], c.bands
            for k, (lo, hi) in enumerate(bands):
                if c.embedding == "adaptive":
                    want[f"embed.adaptive.{k}.W_E"] = (hi - lo, dims[k])
                    want[f"embed.adaptive.{k}.W_proj"] = (dims[k], d)
                if c.unembedding == "adaptive":
                    want[f"unembed.adaptive.{k}.W_U"] = (dims[k], hi - lo)
                    proj = f"unembed.adaptive.{k}.W_proj"
                    if dims[k] != d:
                        want[proj] = (d, dims[k])
                    else:
                        opt[proj] = (d, dims[k])
            if c.unembedding == "adaptive":
                want["unembed.adaptive.head.W_cls"] = (d, len(bands) - 1)
        check(want, opt)
        for i in range(c.n_layers):          # layer by layer: an absurd n_layers fails at the first gap
            p = f"blocks.{i}."
            want = {p + "ln1.w": (d,), p + "ln2.w": (d,), p + "attn.W_Q": (H, d, dh),
                    p + "attn.W_K": (Hk, d, dh), p + "attn.W_V": (Hk, d, dh),
                    p + "attn.W_O": (H, dh, d), p + "mlp.W_in": (d, F), p + "mlp.W_out": (F, d)}
            opt = {p + "ln1.b": (d,), p + "ln2.b": (d,), p + "attn.b_O": (d,), p + "mlp.b_in": (F,),
                   p + "mlp.b_out": (d,), p + "mlp.W_gate": (d, F)}
            qkv = {p + "attn.b_Q": (H, dh), p + "attn.b_K": (Hk, dh), p + "attn.b_V": (Hk, dh)}
            if c.gated_ffn:
                want[p + "mlp.W_gate"] = (d, F)
            if any(n in self.tensors for n in qkv):      # the forward pass adds all three or none
                want.update(qkv)
            check(want, opt, i)

    # -- tokenizer -------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = _load_tokenizer(os.path.join(self.path, "tokenizer.json"))
        return self._tokenizer

    def _tok(self, what: str, fn, *args):
        """Call the tokenizer; its plain Exceptions and Rust panics become one-line FormatErrors."""
        tok = self.tokenizer
        try:
            return fn(tok, *args)
        except RefimplError:
            raise
        except _FATAL:
            raise
        except BaseException as e:      # tokenizers: plain Exception, pyo3 PanicException (a BaseException)
            raise FormatError(f"{os.path.join(self.path, 'tokenizer.json')}: cannot {what} ({_first_line(e)})") from None

    def start_ids(self, prepend_bos: bool | None = None) -> list[int]:
        """The ids put in front of a text prompt. None: the family's convention (config.json
        `prepend_ids`: none for GPT-2, BOS for Llama, `</s>` for fairseq); True: that start
        token, or the tokenizer's BOS where the family has none (GPT-2's <|endoftext|>);
        False: nothing (docs/design-choices.md)."""
        if prepend_bos is None:
            return list(self.cfg.prepend_ids)
        if not prepend_bos:
            return []
        if self.cfg.prepend_ids:
            return list(self.cfg.prepend_ids)
        bos = self.cfg.special_tokens.get("bos")
        if bos is None:
            raise RefimplError(f"{self.path}: the tokenizer has no start (BOS) token to prepend")
        return [int(bos)]

    def encode(self, text: str, prepend_bos: bool | None = None) -> list[int]:
        """Tokenize text and put the start ids in front (`start_ids`)."""
        if not isinstance(text, str) or not text.strip():
            raise RefimplError("empty prompt")
        start = self.start_ids(prepend_bos)
        ids = self._tok("encode the prompt", lambda t: t.encode(text, add_special_tokens=False).ids)
        if not ids and not start:
            raise RefimplError(f"the prompt {text[:60]!r} tokenizes to no tokens")
        return start + list(ids)

    def token_str(self, i: int) -> str:
        """How token i reads: its decoded text (falls back to the raw piece)."""
        def f(tok):
            s = tok.decode([int(i)], skip_special_tokens=False)
            return s if s else (tok.id_to_token(int(i)) or f"<{i}>")
        return self._tok("decode a token", f)

    def decode(self, ids) -> str:
        return self._tok("decode", lambda t: t.decode([int(i) for i in ids], skip_special_tokens=True))


_FATAL = (KeyboardInterrupt, SystemExit, GeneratorExit)
# decoded and encoded once at load, so a tokenizer that fails on ordinary text fails there
_PROBE = ("Once upon a time, the capital of France is Paris. 12345 \t\n  "
          + "".join(map(chr, range(0x20, 0x250))) + " 日本語 中文 한국어 Привет שלום مرحبا ☃ 😀 \x00\x7f")


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


def _precompiled_charsmaps(node):
    """Every `precompiled_charsmap` of a Precompiled normalizer in a tokenizer.json tree."""
    stack = [node]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            if x.get("type") == "Precompiled" and "precompiled_charsmap" in x:
                yield x["precompiled_charsmap"]
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


def _load_tokenizer(path: str):
    """Load tokenizer.json; FormatError (never a panic, abort or plain Exception) if it is broken.

    `tokenizers` indexes a Precompiled normalizer's trie unchecked (a panic at encode) and
    honours `padding: {"Fixed": N}` by allocating N tokens (an abort on a huge N), so
    charsmaps are checked first, padding and truncation (never wanted here) are switched off,
    and the result must encode and decode a probe text.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FormatError(f"{path}: missing (every converted model has a tokenizer.json)") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise FormatError(f"{path}: not UTF-8 text") from None
    return tokenizer_from_text(text, path)


def tokenizer_from_text(text: str, path: str):
    """A `tokenizers.Tokenizer` from tokenizer.json text, checked as `_load_tokenizer` describes."""
    import base64
    import binascii
    from tokenizers import Tokenizer
    try:
        # parsed only when it may name a Precompiled normalizer (also if spelled with \u escapes)
        tree = json.loads(text) if "Precompiled" in text or "\\u" in text else None
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{path}: not valid JSON ({_first_line(e)})") from None
    try:
        from converters.tokenizers.spm import check_precompiled_charsmap
        for cm in _precompiled_charsmaps(tree):
            if not isinstance(cm, str):
                raise FormatError(f"{path}: precompiled_charsmap is not a base64 string")
            try:
                raw = base64.b64decode(cm, validate=True)
            except (binascii.Error, ValueError):
                raise FormatError(f"{path}: precompiled_charsmap is not valid base64") from None
            check_precompiled_charsmap(raw, path)
        tok = Tokenizer.from_str(text)
        tok.no_padding()
        tok.no_truncation()
        ids = tok.encode(_PROBE, add_special_tokens=False).ids
        tok.decode(ids, skip_special_tokens=False)
    except RefimplError:
        raise
    except _FATAL:
        raise
    except BaseException as e:          # tokenizers: plain Exception, pyo3 PanicException (a BaseException)
        raise FormatError(f"{path}: cannot load tokenizer ({_first_line(e)})") from None
    return tok


def load(path: str, dtype: str = "float64", cache_bytes: int = 1 << 30) -> Model:
    """Open a canonical model directory (docs/format.md). Reads headers only."""
    if not os.path.isdir(path):
        raise RefimplError(f"{path}: model directory not found")
    cfg = read_config(path)
    return Model(path, cfg, _index_tensors(path), dtype=dtype, cache_bytes=cache_bytes)
