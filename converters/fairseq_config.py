"""The configuration of a fairseq `transformer_lm` checkpoint, read and validated.

`read_options` takes the options from `args` (an argparse.Namespace, fairseq <= 0.9), or
`cfg` (omegaconf DictConfig, fairseq 0.10, or a plain dict, fairseq 0.12), whose `model` /
`task` sections hold the same field names; the pickled objects arrive as `Inert` records
and are turned into plain data with `to_plain`. Fields fairseq renamed are read the way
fairseq's loader reads them (`max_positions`, `no_tie_adaptive_proj`, `decoder_final_norm`),
and missing fields get the defaults of the named architecture function, then of
`base_lm_architecture`. For every named architecture except the dataclass `transformer_lm`,
fairseq re-runs the architecture function on load, which forces
`decoder_normalize_before=True`.

`architecture` checks the options and returns the normalised architecture dict that
`converters/fairseq_lm.py` maps the weights with. It refuses, with a one-line error, other
architectures, post-norm, other activations, and the options listed in `REFUSED_TRUE` and
below it (pruned layers, BASE layers, xformers attention, project_in/out_dim, quant-noise
on plain embeddings, a truncated output dictionary, inconsistent adaptive settings). The
only weight it reads is `decoder.version`, which decides whether the final LayerNorm exists.
"""
from __future__ import annotations

import ast
import math
import re

import numpy as np

from refimpl.config import short
from refimpl.errors import FormatError

from .hf_common import Weights

DEFAULT_MAX_TARGET_POSITIONS = 1024          # fairseq.models.transformer_lm
ARCH_RE = re.compile(r"transformer_lm(_big|_wiki103|_baevski_wiki103|_gbw|_baevski_gbw|_gpt|_gpt2_[a-z_]+"
                     r"|_gpt3_[0-9a-z_]+)?$")
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_accurate": "gelu_new", "gelu_fast": "gelu_new"}
# defaults the named architecture functions give fields a checkpoint may lack (then base_lm_architecture's)
ARCH_DEFAULTS = {
    "transformer_lm_wiki103": dict(adaptive_input=True, tie_adaptive_weights=True, tie_adaptive_proj=True,
                                   adaptive_input_cutoff="20000,60000", adaptive_softmax_cutoff="20000,60000",
                                   no_decoder_final_norm=True, decoder_layers=16, decoder_attention_heads=8),
    "transformer_lm_gbw": dict(no_decoder_final_norm=True),
    "transformer_lm_gpt": dict(activation_fn="gelu"),
}
ARCH_DEFAULTS["transformer_lm_baevski_wiki103"] = ARCH_DEFAULTS["transformer_lm_wiki103"]
ARCH_DEFAULTS["transformer_lm_baevski_gbw"] = ARCH_DEFAULTS["transformer_lm_gbw"]
BASE_DEFAULTS = dict(decoder_learned_pos=False, activation_fn="relu", adaptive_softmax_factor=4,
                     adaptive_input_factor=4, no_decoder_final_norm=False, adaptive_input=False,
                     tie_adaptive_weights=False, tie_adaptive_proj=False, no_scale_embedding=False,
                     share_decoder_input_output_embed=False)
# options that change the maths in ways the canonical format cannot express: name -> why
REFUSED_TRUE = {
    "character_embeddings": "character-CNN input embeddings",
    "layernorm_embedding": "a LayerNorm on the embeddings",
    "no_token_positional_embeddings": "a model without position embeddings",
    "cross_self_attention": "cross+self attention (an encoder-decoder option)",
    "scale_attn": "NormFormer attention LayerNorm (scale_attn)",
    "scale_fc": "NormFormer FFN LayerNorm (scale_fc)",
    "scale_heads": "NormFormer head scaling (scale_heads)",
    "scale_resids": "NormFormer residual scaling (scale_resids)",
}


class Options:
    """The model / task options of a fairseq checkpoint, with fairseq's legacy renames and
    defaults; `None` counts as absent (as fairseq's safe_getattr does)."""

    def __init__(self, model: dict, task: dict, kind: str, where: str):
        self.model, self.task, self.kind, self.where = dict(model), dict(task), kind, where
        m = self.model
        if m.get("max_target_positions") is None and m.get("max_positions") is not None:
            m["max_target_positions"] = m["max_positions"]          # checkpoint_utils._upgrade_state_dict
        if "no_tie_adaptive_proj" in m:                              # base_lm_architecture: 2019 checkpoints
            m["no_decoder_final_norm"] = True
            if m["no_tie_adaptive_proj"] is False:
                m["tie_adaptive_proj"] = True
        if m.get("decoder_final_norm") is not None:
            m["no_decoder_final_norm"] = not m["decoder_final_norm"]
        arch = m.get("_name") or m.get("arch")
        self.arch = arch
        self.defaults = dict(BASE_DEFAULTS)
        self.defaults.update(ARCH_DEFAULTS.get(arch, {}))
        if isinstance(arch, str) and arch.startswith("transformer_lm_gpt"):
            self.defaults.setdefault("activation_fn", "gelu")

    def get(self, key, default=None):
        v = self.model.get(key)
        if v is None:
            v = self.defaults.get(key, default)
        return v

    def _bad(self, key, v, want):
        return FormatError(f"{self.where}: model option {key}={short(v, 60)} must be {want}")

    def int(self, key, default=None) -> int:
        v = self.get(key, default)
        if v is None:
            raise FormatError(f"{self.where}: the checkpoint's model options have no {key!r}")
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise self._bad(key, v, "a positive integer")
        return v

    def bool(self, key, default=False) -> bool:
        v = self.get(key, default)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v in (0, 1):
            v = bool(v)
        if not isinstance(v, bool):
            raise self._bad(key, v, "true or false")
        return v

    def number(self, key, default=None) -> float:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise self._bad(key, v, "a positive number")
        return float(v)

    def cutoffs(self, key) -> list[int] | None:
        """fairseq's eval_str_list(x, int): '20000,60000' / '[20000, 60000]' / 20000 / a list."""
        v = self.get(key)
        if v is None:
            return None
        if isinstance(v, str):
            if len(v) > 4096:
                raise self._bad(key, v, "a short comma-separated list of integers")
            try:
                v = ast.literal_eval(v)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise self._bad(key, v, "a comma-separated list of integers") from None
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v]
        ints = isinstance(v, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)
        if not ints or not v or list(v) != sorted(set(v)):
            raise self._bad(key, v, "increasing positive integers")
        return list(v)


def read_options(obj: dict, where: str) -> Options:
    """The model options of a fairseq checkpoint (args Namespace, cfg DictConfig or cfg dict)."""
    from .torch_objects import to_plain as _to_plain

    def to_plain(x):
        try:
            return _to_plain(x)
        except FormatError as e:
            raise FormatError(f"{where}: {e}") from None
    args, cfg = obj.get("args"), obj.get("cfg")
    model = task = None
    if cfg is not None:
        kind = "cfg (DictConfig)" if not isinstance(cfg, dict) else "cfg (dict)"
        cfg = to_plain(cfg)
        if not isinstance(cfg, dict):
            raise FormatError(f"{where}: the checkpoint's 'cfg' is a {type(cfg).__name__}, not a config")
        model, task = cfg.get("model"), cfg.get("task")
    if model is None and args is not None:      # fairseq: cfg.model falls back to args
        args = to_plain(args)
        if not isinstance(args, dict):
            raise FormatError(f"{where}: the checkpoint's 'args' is a {type(args).__name__}, not a Namespace")
        model, kind = args, "args"
        task = task if task is not None else args
    if model is None:
        raise FormatError(f"{where}: fairseq checkpoint has neither 'args' nor 'cfg' model options; "
                          f"cannot tell its architecture")
    if not isinstance(model, dict):
        raise FormatError(f"{where}: the checkpoint's model options are a {type(model).__name__}, not a mapping")
    return Options(model, task if isinstance(task, dict) else {}, kind, where)


def architecture(o: Options, sd: Weights) -> dict:
    """Validated architecture description from the options (cross-checked against shapes later)."""
    w = o.where
    arch = o.arch
    if not isinstance(arch, str) or not ARCH_RE.match(arch):
        raise FormatError(f"{w}: architecture {short(arch, 60)} is not supported (only fairseq's "
                          f"transformer_lm language models)")
    for key, what in REFUSED_TRUE.items():
        if o.bool(key, False):
            raise FormatError(f"{w}: {key}=True ({what}) is not supported")
    if o.get("decoder_layers_to_keep"):
        raise FormatError(f"{w}: decoder_layers_to_keep (a pruned model) is not supported")
    if o.get("base_layers", 0) not in (0, None):
        raise FormatError(f"{w}: base_layers={short(o.get('base_layers'))} (BASE layers) is not supported")
    if o.get("decoder_xformers_att_config"):
        raise FormatError(f"{w}: decoder_xformers_att_config (xformers attention) is not supported")
    if o.get("output_dictionary_size", -1) not in (-1, None) or \
            o.task.get("output_dictionary_size", -1) not in (-1, None):
        raise FormatError(f"{w}: output_dictionary_size (a truncated output vocabulary) is not supported")
    # every named architecture's function forces pre-norm; the dataclass model keeps the option
    pre = True if arch != "transformer_lm" else o.bool("decoder_normalize_before", False)
    if not pre:
        raise FormatError(f"{w}: decoder_normalize_before=False (a post-norm transformer) is not supported")
    act = o.get("activation_fn")
    if act not in ACTIVATIONS:
        raise FormatError(f"{w}: activation_fn {short(act, 40)} is not supported (known: {', '.join(ACTIVATIONS)})")

    d = o.int("decoder_embed_dim")
    d_in = o.int("decoder_input_dim", d)
    d_out = o.int("decoder_output_dim", d)
    H = o.int("decoder_attention_heads")
    if d % H:
        raise FormatError(f"{w}: decoder_embed_dim {d} is not a multiple of decoder_attention_heads {H}")
    if d_out != d:
        raise FormatError(f"{w}: decoder_output_dim {d_out} != decoder_embed_dim {d} (project_out_dim) "
                          f"is not supported")
    adaptive_in = o.bool("adaptive_input")
    tie_adaptive = o.bool("tie_adaptive_weights")
    soft_cut = o.cutoffs("adaptive_softmax_cutoff")
    in_cut = o.cutoffs("adaptive_input_cutoff") if adaptive_in else None
    if adaptive_in and in_cut is None:
        raise FormatError(f"{w}: adaptive_input=True but adaptive_input_cutoff is not set")
    if not adaptive_in and d_in != d:
        raise FormatError(f"{w}: decoder_input_dim {d_in} != decoder_embed_dim {d} (project_in_dim) "
                          f"is not supported")
    qn = o.get("quant_noise_pq", 0)
    if not adaptive_in and isinstance(qn, (int, float)) and qn > 0:
        raise FormatError(f"{w}: quant_noise_pq > 0 without adaptive input (an extra quant-noise Linear "
                          f"on the embeddings) is not supported")
    if tie_adaptive and not (adaptive_in and soft_cut is not None):
        raise FormatError(f"{w}: tie_adaptive_weights=True needs adaptive_input and adaptive_softmax_cutoff")
    share = o.bool("share_decoder_input_output_embed")
    if share and soft_cut is None and adaptive_in:
        raise FormatError(f"{w}: share_decoder_input_output_embed with adaptive input is not supported")
    add_bos = o.bool("add_bos_token") or (isinstance(o.task.get("add_bos_token"), bool) and o.task["add_bos_token"])
    # TransformerLanguageModel.build_model: max_target_positions defaults to tokens_per_sample, then 1024
    tps = o.get("tokens_per_sample") or o.task.get("tokens_per_sample") or DEFAULT_MAX_TARGET_POSITIONS
    n_ctx = o.int("max_target_positions", tps)
    version = 1.0
    if "decoder.version" in sd:
        v = np.asarray(sd["decoder.version"].numpy(), dtype=np.float64).ravel()
        if v.size != 1:
            raise FormatError(f"{sd.where()}: decoder.version has {v.size} elements, expected 1")
        version = float(v[0])
    no_final = o.bool("no_decoder_final_norm")
    return dict(arch=arch, d=d, d_in=d_in, H=H, F=o.int("decoder_ffn_embed_dim"), L=o.int("decoder_layers"),
                act=ACTIVATIONS[act], fairseq_act=act, learned_pos=o.bool("decoder_learned_pos"),
                embed_scale=1.0 if o.bool("no_scale_embedding") else math.sqrt(d),
                adaptive_in=adaptive_in, in_cut=in_cut, in_factor=o.number("adaptive_input_factor"),
                soft_cut=soft_cut, soft_factor=o.number("adaptive_softmax_factor"),
                tie_adaptive=tie_adaptive, tie_proj=tie_adaptive and o.bool("tie_adaptive_proj"),
                share=share, n_ctx=n_ctx, prepend=[0] if add_bos else [2], version=version,
                final_norm=(not no_final) and version > 2)
