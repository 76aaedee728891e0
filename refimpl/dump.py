"""`refimpl dump` and `refimpl compare`: the trace as a file, and file-to-file comparison.

A dump is a safetensors file of every residual-stream vector and decomposition of one
forward pass, named with TransformerLens hook names where one exists (batch dimension
dropped) and `refimpl.*` names for what TransformerLens lacks. docs/oracle.md lists
every name and shape, so another implementation can write the same file and be checked
with `refimpl compare`.
"""
from __future__ import annotations

import json
import os

import numpy as np

from . import __version__, nn
from .errors import RefimplError
from .files import write_new_file
from .safetensors_io import read_header, spec_of, write_safetensors
from .significance import attn_subvalue_significance, ffn_subvalue_significance, layer_significance


def _norm_hooks(model, prefix: str, x: np.ndarray) -> dict[str, np.ndarray]:
    mu, scale = nn.norm_stats(model.cfg.norm, x, model.cfg.norm_eps)        # [T, 1]
    return {f"{prefix}.hook_scale": scale, f"{prefix}.hook_normalized": (x - mu) / scale}


def dump_tensors(trace, t: int, w: int, readout: str = "frozen", subvalue_scores: bool = True) -> dict[str, np.ndarray]:
    """{name: array} of the trace (docs/oracle.md); subvalue data is for analysed position t and target w."""
    model, cfg = trace.model, trace.model.cfg
    out = {"hook_embed": trace.embed_tok}
    if trace.embed_pos is not None:
        out["hook_pos_embed"] = trace.embed_pos
    R = trace.readout(t, readout)
    layers = layer_significance(trace, w, t, R)
    for i, L in enumerate(trace.layers):
        b, W_O = f"blocks.{i}.", model.weight(f"blocks.{i}.attn.W_O")
        out.update({b + "hook_resid_pre": L.lin, b + "hook_attn_out": L.attn, b + "hook_resid_mid": L.lres,
                    b + "hook_mlp_out": L.ffn, b + "hook_resid_post": L.lout,
                    b + "attn.hook_q": L.q, b + "attn.hook_k": L.k, b + "attn.hook_v": L.v,
                    b + "attn.hook_pattern": L.pattern, b + "attn.hook_z": L.z,
                    b + "attn.hook_result": np.einsum("the,hed->thd", L.z, W_O, optimize=True),   # [T, H, d]
                    b + "mlp.hook_post": L.m})
        out.update(_norm_hooks(model, b + "ln1", L.lin))
        out.update(_norm_hooks(model, b + "ln2", L.lres))
        if cfg.gated_ffn:
            out[b + "mlp.hook_pre"], out[b + "mlp.hook_pre_linear"] = L.gate_pre, L.pre
        else:
            out[b + "mlp.hook_pre"] = L.pre
        r = f"refimpl.blocks.{i}."
        out.update({r + "attn.subvalues_by_position": trace.attn_subvalues(i, t, "position"),   # [t+1, d]
                    r + "attn.bias_subvalue": trace.attn_bias_subvalue(i),
                    r + "mlp.subvalues": trace.ffn_subvalues(i, t),                               # [F, d]
                    r + "mlp.bias_subvalue": trace.ffn_bias_subvalue(i),
                    r + "attn.log_prob_increase": np.array(layers[i]["attn"]["log_prob_increase"]),
                    r + "attn.prob_increase": np.array(layers[i]["attn"]["prob_increase"]),
                    r + "mlp.log_prob_increase": np.array(layers[i]["ffn"]["log_prob_increase"]),
                    r + "mlp.prob_increase": np.array(layers[i]["ffn"]["prob_increase"])})
        if subvalue_scores:
            s = attn_subvalue_significance(trace, i, w, t, "position", R)
            out[r + "attn.subvalue_log_prob_increase"] = s["log_prob_increase"]
            out[r + "attn.subvalue_prob_increase"] = s["prob_increase"]
            c, p = ffn_subvalue_significance(trace, i, w, t, readout=R)
            out[r + "mlp.subvalue_log_prob_increase"], out[r + "mlp.subvalue_prob_increase"] = c, p
    if cfg.final_norm:
        out.update(_norm_hooks(model, "ln_final", trace.final))
    out["refimpl.log_probs"] = trace.log_probs
    if trace.logits is not None:
        out["logits"] = trace.logits
    return out


def write_dump(path: str, trace, t: int, w: int, readout: str = "frozen", subvalue_scores: bool = True,
               force: bool = False) -> None:
    """Write the dump atomically (refimpl.files.write_new_file: a temporary file in the same
    folder, then a no-clobber link; never through a symbolic link; an existing file only
    with `force`)."""
    tensors = dump_tensors(trace, t, w, readout, subvalue_scores)
    tensors = {k: np.ascontiguousarray(v, dtype=trace.model.dtype) for k, v in tensors.items()}
    meta = {"model": os.path.abspath(trace.model.path), "family": trace.model.cfg.family,
            "ids": json.dumps([int(i) for i in trace.ids]), "dtype": str(trace.model.dtype), "readout": readout,
            "position": str(t), "target": str(w), "refimpl_version": __version__}
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise RefimplError(f"{path}: output folder does not exist")
    names = sorted(tensors)
    write_new_file(path, lambda f: write_safetensors(f, [spec_of(n, tensors[n]) for n in names],
                                                     ((n, tensors[n]) for n in names), meta), force=force)


def compare_files(a: str, b: str, rtol: float = 1e-10, atol: float = 1e-12) -> tuple[list[dict], dict]:
    """Per shared tensor: max abs/rel difference and the first index exceeding atol + rtol*|b|."""
    ta, _ = read_header(a)
    tb, _ = read_header(b)
    rows = []
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name].numpy(np.float64), tb[name].numpy(np.float64)
        row = {"name": name, "shape_a": list(x.shape), "shape_b": list(y.shape)}
        if x.shape != y.shape:
            row.update(ok=False, problem="shape mismatch")
            rows.append(row)
            continue
        diff = np.abs(x - y)
        with np.errstate(invalid="ignore"):
            bad = ~(diff <= atol + rtol * np.abs(y))                            # NaN counts as bad
        rel = diff / np.maximum(np.abs(y), np.finfo(np.float64).tiny)
        row.update(max_abs=float(np.nanmax(diff)) if diff.size else 0.0,
                   max_rel=float(np.nanmax(rel)) if rel.size else 0.0, ok=not bad.any())
        if bad.any():
            idx = np.unravel_index(int(np.argmax(bad)), bad.shape)
            row["first_bad_index"] = [int(i) for i in idx]
            row["values_at_first_bad"] = [float(x[idx]), float(y[idx])]
        rows.append(row)
    only = {"only_in_a": sorted(set(ta) - set(tb)), "only_in_b": sorted(set(tb) - set(ta))}
    return rows, only
