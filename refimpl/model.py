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
import warnings
from collections import OrderedDict

import numpy as np

from .config import Config, check_tensors, looks_canonical, read_config, resolve_name, short
from .errors import FormatError, RefimplError
from .files import read_json
from .safetensors_io import NUMPY_TO_ST, StoredTensor, bf16_to_f32, read_header

DTYPES = {"float32": np.float32, "float64": np.float64}
PINNED = ("unembed.", "ln_final.")


def _index_tensors(model_dir: str) -> dict[str, StoredTensor]:
    """{name: tensor} of every weight file: model.safetensors, or the shards listed in
    model.safetensors.index.json. The index is type-checked and must agree with the shards
    exactly (every listed tensor in its shard, every stored tensor listed); a tensor in two
    shards is an error (never "the later one wins")."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.lexists(index):
        doc = read_json(index)
        wm = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise FormatError(f"{index}: invalid shard index (no weight_map object of tensor names)")
        for k, v in wm.items():
            if not isinstance(v, str):
                raise FormatError(f"{index}: invalid shard index: tensor {short(k)} maps to {short(v)}, "
                                  f"not a file name")
            if os.path.basename(v) != v or v in ("", ".", "..") or not v.endswith(".safetensors"):
                raise FormatError(f"{index}: shard name {short(v)} is not a plain .safetensors file name")
        files = sorted(set(wm.values()))
    elif os.path.lexists(single):
        files, wm = ["model.safetensors"], None
    else:
        raise FormatError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, StoredTensor] = {}
    for fname in files:
        t, _ = read_header(os.path.join(model_dir, fname))
        for k, v in t.items():
            if k in tensors:
                raise FormatError(f"{os.path.join(model_dir, fname)}: tensor {short(k)} is also in "
                                  f"{os.path.basename(tensors[k].path)}")
            if wm is not None and wm.get(k) != fname:
                raise FormatError(f"{index}: tensor {short(k)} is stored in {fname} but the index "
                                  f"{'lists ' + short(wm[k]) if k in wm else 'does not list it'}")
            tensors[k] = v
    if wm is not None and set(wm) != set(tensors):
        missing = sorted(set(wm) - set(tensors))[0]
        raise FormatError(f"{index}: lists tensor {short(missing)} in {wm[missing]}, which does not hold it")
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
        self._scratch: dict[tuple, np.ndarray] = {}         # per-layer buffers reused by block(), 2 sets
        self._cached = 0
        self.pinned: set[str] = set()                       # names kept outside the budget (Model.pin)
        self._tokenizer = None
        self._tokenizer_future = None
        self._prefetch = None                               # (layer, Future) of the next streamed block
        self._last_block = None
        self._worker = None
        self._check_tensors()
        self.upcast_cache = self._open_upcast_cache()

    def __repr__(self) -> str:
        c = self.cfg
        return (f"Model({os.path.basename(os.path.normpath(self.path))!r}, family={c.family}, n_layers={c.n_layers}, "
                f"d_model={c.d_model}, n_heads={c.n_heads}, d_ff={c.d_ff}, d_vocab={c.d_vocab}, "
                f"dtype={self.dtype.name}, path={self.path!r})")

    # -- the prepared weight copy (refimpl/cache.py binds it to the model's exact files) ---------
    def needs_upcast(self) -> bool:
        """Whether any stored tensor differs from the compute dtype (and so has to be widened)."""
        if getattr(self, "_needs_upcast", None) is None:
            self._needs_upcast = any(t.dtype != NUMPY_TO_ST[self.dtype] for t in self.tensors.values())
        return self._needs_upcast

    def _open_upcast_cache(self):
        """The weights in the compute dtype, if `refimpl prepare` wrote them for exactly these
        files (else None: a stale or damaged copy is never used)."""
        if not self.needs_upcast():
            return None                                   # nothing to convert anyway
        from . import cache
        return cache.open_weights(self)

    def write_upcast_cache(self) -> str:
        """Write every tensor in the compute dtype (exact: widening only) as `refimpl prepare`
        does, one part per layer, resuming an interrupted copy; returns the entry's path."""
        from . import cache, progress
        path = cache.write_weights(self, progress.current())
        self.upcast_cache = self._open_upcast_cache()
        return path

    # -- tensors -------------------------------------------------------------------
    def _resolve(self, name: str) -> tuple[str, bool]:
        """Map a canonical name to (stored name, transpose?) following the ties of docs/format.md."""
        return resolve_name(self.cfg, name)

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
        return self._remember(name, a.T if transpose else a)

    def pin(self, names) -> int:
        """Keep these tensors, once widened, in the cache for good (outside the cache_bytes budget,
        never evicted): `refimpl batch` pins every W_O of a streaming model. Returns their bytes
        in the compute dtype."""
        names = [n for n in names if self._resolve(n)[0] in self.tensors]
        self.pinned.update(names)
        return sum(math.prod(self.tensors[self._resolve(n)[0]].shape) for n in names) * self.dtype.itemsize

    def _remember(self, name: str, a: np.ndarray) -> np.ndarray:
        """Keep an upcast tensor in the LRU cache (the readout's always)."""
        if name.startswith(PINNED) or name in self.pinned:   # the readout (every analysis reads it), pins
            self._cache[name] = a
            return a
        if a.nbytes <= self.cache_bytes:
            self._cache[name] = a
            self._cached += a.nbytes
            if self._cached > self.cache_bytes:
                for key in [k for k in self._cache if not k.startswith(PINNED) and k not in self.pinned]:
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

    def matvec(self, name: str, v: np.ndarray, block: int = 256) -> np.ndarray:
        """W @ v for a 2-d tensor W [n, m] in the compute dtype (row_blocks: no full-size copy
        of a large layer)."""
        return np.concatenate([b @ v for _, b in self.row_blocks(name, block)])

    def row_blocks(self, name: str, block: int = 256):
        """Yield (first row, rows [n_b, m] in the compute dtype) of a 2-d tensor: the whole
        tensor at once when it is cached, prepared, stored in the compute dtype, transposed
        (a tie) or when the whole model fits the weight cache (widened once, kept); else
        `block` rows at a time, widened into one reused buffer (valid until the next block)
        and never cached: a single pass over a large layer that the weight cache does not
        hold would otherwise widen and evict it."""
        src, transpose = self._resolve(name)
        st = self.tensors.get(src)
        if transpose or name in self._cache or st is None or st.dtype == NUMPY_TO_ST[self.dtype] \
                or (self.upcast_cache is not None and src in self.upcast_cache) or len(st.shape) != 2 \
                or self._fits_cache():
            yield 0, self.weight(name)
            return
        raw = st.raw()
        buf = np.empty((min(block, st.shape[0]), st.shape[1]), self.dtype)  # [block, m]
        for a in range(0, st.shape[0], block):
            rows = raw[a:a + block]
            b = buf[:len(rows)]
            b[...] = rows if st.dtype != "BF16" else bf16_to_f32(rows)
            yield a, b

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
        """All weights of block i in the compute dtype, keyed by the part after `blocks.{i}.`.

        A model larger than the weight cache streams: each layer is widened into one of two
        sets of reused buffers, and while the caller works on layer i (the forward pass goes
        in order) a background thread widens layer i+1 into the other set. So a result is
        valid until block(i+2) is asked for (never keep it longer). The attention output
        matrices W_O and the 1-d tensors (norms, biases), which the analyses read again after
        the forward pass, are widened into their own arrays and kept in the cache."""
        if not 0 <= i < self.cfg.n_layers:
            raise RefimplError(f"layer {i} out of range (model has {self.cfg.n_layers} layers)")
        prefix = f"blocks.{i}."
        names = [n for n in self.tensors if n.startswith(prefix)]
        if self._fits_cache() or self.upcast_cache is not None:
            return {n[len(prefix):]: self.weight(n) for n in names}
        pending, self._prefetch = self._prefetch, None
        widened = None
        if pending is not None:
            got = pending[1].result()                  # never two writers in one buffer set
            widened = got if pending[0] == i else None
        if widened is None:
            widened = self._widen_block(i)
        sequential = self._last_block is None or self._last_block == i - 1
        self._last_block = i
        if sequential and i + 1 < self.cfg.n_layers and self._streams_with_copies():
            self._prefetch = (i + 1, self._background().submit(self._widen_block, i + 1))
        if sequential and not self._all_read_ahead:        # the disk works ahead of the forward pass
            ahead = [f"blocks.{j}." for j in (i + 1, i + 2) if j < self.cfg.n_layers]
            if i + 2 >= self.cfg.n_layers:
                ahead += list(PINNED)
            self._background().submit(self._read_ahead, ahead)
        out = {}
        for n in names:
            key = n[len(prefix):]
            if n in self._cache:
                out[key] = self.weight(n)
            elif key in widened and self._keep(key, widened[key].shape):
                out[key] = self._remember(n, widened[key])
            elif key in widened:
                out[key] = widened[key]
            else:
                out[key] = self.weight(n)
        return out

    @staticmethod
    def _keep(key: str, shape: tuple) -> bool:
        return key == "attn.W_O" or len(shape) == 1

    def _widen_block(self, i: int) -> dict[str, np.ndarray]:
        """Layer i's stored tensors in the compute dtype (runs in the background thread too: it
        reads no cache, only the memory maps, and writes buffer set i % 2 or new arrays)."""
        prefix, out = f"blocks.{i}.", {}
        for n in self.tensors:
            if not n.startswith(prefix) or n in self._cache:
                continue
            key = n[len(prefix):]
            st = self.tensors[n]
            if st.dtype == NUMPY_TO_ST[self.dtype] or self._keep(key, st.shape):
                out[key] = self._upcast(n)
            else:           # two buffer sets only when prefetching (else one: no more memory than one layer)
                slot = (i % 2 if self._streams_with_copies() else 0, key)
                out[key] = self._scratch[slot] = self._upcast(n, self._scratch.get(slot))
        return out

    def _streams_with_copies(self) -> bool:
        """Whether a streamed block is worth widening ahead in the background: it widens anything
        (else it is memory maps only) and a second set of layer buffers is small (a quarter of the
        cache), so the prefetch never raises the peak memory of a large model."""
        if getattr(self, "_prefetch_ok", None) is None:
            layer = sum(math.prod(t.shape) for n, t in self.tensors.items() if n.startswith("blocks.0."))
            self._prefetch_ok = self.needs_upcast() and layer * self.dtype.itemsize <= self.cache_bytes // 4
        return self._prefetch_ok

    def _background(self):
        if self._worker is None:
            from concurrent.futures import ThreadPoolExecutor
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="refimpl-prefetch")
        return self._worker

    _all_read_ahead = False

    def _read_ahead(self, prefixes) -> None:
        """Ask the OS to read the stored tensors whose names start with `prefixes` into the page
        cache (posix_fadvise WILLNEED: asynchronous, no memory of this process), so that the
        first use of a weight does not wait for the disk."""
        spans: dict[str, list] = {}
        for n, st in self.tensors.items():
            if n.startswith(tuple(prefixes)) and st.nbytes:
                spans.setdefault(st.path, []).append((st.offset, st.nbytes))
        for path, sp in spans.items():
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                for off, n in sp:
                    os.posix_fadvise(fd, off, n, os.POSIX_FADV_WILLNEED)
            except (OSError, AttributeError):
                pass
            finally:
                os.close(fd)

    def warm_start(self) -> None:
        """Start, in background threads, what every analysis needs first: loading the tokenizer,
        reading the weights from disk ahead of their use (all of them when they take under a
        quarter of the RAM, else the first layers; block() keeps reading two layers ahead) and
        widening layer 0 (the CLI calls this right after opening the model, so that all of it
        overlaps with each other and with the rest of the start-up)."""
        total = sum(t.nbytes for t in self.tensors.values())
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            ram = 0
        self._all_read_ahead = 0 < total <= ram // 4
        self._background().submit(self._read_ahead, [""] if self._all_read_ahead else
                                  ["blocks.0.", "blocks.1.", "embed.", "pos_embed."])
        if self._tokenizer is None and self._tokenizer_future is None:
            from concurrent.futures import ThreadPoolExecutor
            pool = ThreadPoolExecutor(1, thread_name_prefix="refimpl-tokenizer")
            self._tokenizer_future = pool.submit(_load_tokenizer, os.path.join(self.path, "tokenizer.json"))
            pool.shutdown(wait=False)
        if self._prefetch is None and not (self._fits_cache() or self.upcast_cache is not None) \
                and self._streams_with_copies() and self.cfg.n_layers:
            self._prefetch = (0, self._background().submit(self._widen_block, 0))

    def _fits_cache(self) -> bool:
        if getattr(self, "_n_elements", None) is None:
            self._n_elements = sum(math.prod(t.shape) for t in self.tensors.values())
        return self._n_elements * self.dtype.itemsize <= self.cache_bytes

    def _check_tensors(self) -> None:
        """Every tensor the forward pass reads exists with the shape the config implies, and every
        stored tensor is one the config explains (refimpl.config.check_tensors)."""
        check_tensors(self.cfg, {n: t.shape for n, t in self.tensors.items()}, self.path)

    # -- tokenizer -------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            fut, self._tokenizer_future = self._tokenizer_future, None
            self._tokenizer = fut.result() if fut is not None else \
                _load_tokenizer(os.path.join(self.path, "tokenizer.json"))     # errors raise here, as before
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

    @property
    def unk_id(self) -> int | None:
        """Id of the tokenizer's unknown token (what out-of-vocabulary text becomes), or None."""
        if not hasattr(self, "_unk_id"):
            def find(tok):
                model = tok.model
                if type(model).__name__ != "Unigram":          # BPE, WordPiece, WordLevel: a getter (fast)
                    unk_token = getattr(model, "unk_token", None)
                    return tok.token_to_id(unk_token) if isinstance(unk_token, str) else None
                m = json.loads(tok.to_str()).get("model") or {}     # Unigram keeps unk_id in the JSON only
                if m.get("type") == "Unigram" and isinstance(m.get("unk_id"), int):
                    return m["unk_id"]
                return tok.token_to_id(m["unk_token"]) if isinstance(m.get("unk_token"), str) else None
            unk = self._tok("read the unknown token", find)
            if unk is None:
                unk = self.cfg.special_tokens.get("unk")
            self._unk_id = unk if isinstance(unk, int) and 0 <= unk < self.cfg.d_vocab else None
        return self._unk_id

    def unknown_words(self, text: str, prepend_bos: bool | None = None) -> list[tuple[int, str]]:
        """(position in the encoded ids, the prompt's text) of every piece of `text` that the
        tokenizer turned into its unknown token (the literal unknown-token text excepted)."""
        unk = self.unk_id
        if unk is None or not isinstance(text, str) or not text.strip():
            return []
        enc = self._tok("encode the prompt", lambda t: t.encode(text, add_special_tokens=False))
        unk_piece = self.token_str(unk)
        pre = len(self.start_ids(prepend_bos))
        return [(pre + k, text[a:b]) for k, (i, (a, b)) in enumerate(zip(enc.ids, enc.offsets))
                if i == unk and text[a:b] not in (unk_piece, self._tok("look up", lambda t: t.id_to_token(unk)))]

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


# tokenizer loading lives in refimpl/tokenizer.py; these names are kept for the importers
from .tokenizer import _FATAL, _first_line, load_tokenizer as _load_tokenizer, tokenizer_from_text  # noqa: E402,F401


def check_converted(path: str) -> str:
    """`path` if it may be a converted model; else FormatError saying which checkpoint it is and
    the `refimpl convert` command (refimpl/checkpoints.py)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path) or not looks_canonical(cfg_path):
        from .checkpoints import unconverted_message
        msg = unconverted_message(path)
        if msg:
            raise FormatError(msg)
    return path


def load(path: str, dtype: str = "float64", cache_bytes: int = 1 << 30) -> Model:
    """Open a canonical model directory (docs/format.md). Reads headers only."""
    if not os.path.isdir(path):
        raise RefimplError(f"{path}: model directory not found")
    cfg = read_config(check_converted(path))
    model = Model(path, cfg, _index_tensors(path), dtype=dtype, cache_bytes=cache_bytes)
    edited = recorded_hash_mismatches(path)
    if edited.get("tokenizer.json"):
        model.tokenizer                         # an unusable tokenizer is refused first: no warning precedes an error
    for msg in edited.values():
        warnings.warn(msg, UserWarning, stacklevel=2)
    return model


def recorded_hash_mismatches(path: str) -> dict:
    """The small files a conversion records are checked on every load (milliseconds): config.json
    against the config_sha256 recorded in it, tokenizer.json against its sha256 in `files`.
    Returns {file: message} for those edited since. `load` warns (an edited config may be an
    experiment): the results are then those of the edited model, and say so. The weight files
    are checked by `refimpl verify` (hashing gigabytes on every load would cost seconds)."""
    import hashlib
    from .config import config_digest
    from .files import read_bytes
    out = {}
    try:
        raw = json.loads(read_bytes(os.path.join(path, "config.json"), "json"))
    except (FormatError, OSError, ValueError):
        return out                                          # read_config has read it; nothing to add
    if isinstance(raw.get("config_sha256"), str) and config_digest(raw) != raw["config_sha256"]:
        out["config.json"] = (f"{os.path.join(path, 'config.json')}: edited since conversion (its content no longer "
                              f"matches the config_sha256 recorded in it): the results are those of the edited "
                              f"model; `refimpl verify {path}` lists what differs")
    files = raw.get("files")
    want = files.get("tokenizer.json") if isinstance(files, dict) else None
    if not isinstance(want, str):
        return out
    tok = os.path.join(path, "tokenizer.json")
    try:
        got = hashlib.sha256(read_bytes(tok, "tokenizer")).hexdigest()
    except (FormatError, OSError):
        return out                                          # reported when the tokenizer is loaded
    if got != want:
        out["tokenizer.json"] = (f"{tok}: not the tokenizer recorded at conversion (its sha256 differs): token ids "
                                 f"and texts may not be the model's; `refimpl verify {path}` lists what differs")
    return out
