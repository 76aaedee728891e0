"""Cross-check against TransformerLens (3.x HookedTransformer) run on the same weights.

A random GPT-2 and a random grouped-query Llama (n_kv_heads < n_heads) are loaded into a
`HookedTransformer` built from a `HookedTransformerConfig` matching our config, through
`load_and_process_state_dict` with every processing flag off (what
`from_pretrained_no_processing` does after reading a checkpoint). Every hook in
docs/oracle.md is then compared with `refimpl.dump.dump_tensors`, in memory and through
`refimpl compare` on safetensors files; the RoPE convention and TransformerLens's
weight processing (`process_weights_`) are checked separately. docs/oracle.md
("Conventions") states the findings.

Tolerance (`bound`): a first-order worst-case rounding model. A length-n reduction in
precision u errs by at most ~ n u times the magnitude of its terms; the path from the
embedding to the logits has about 9 reductions per layer (norm statistics, q/k/v, scores,
softmax, z, W_O, norm statistics, W_in, W_out) plus 2 (final norm, unembedding), and both
implementations round independently, so

    bound = 2 * (9 * n_layers + 2) * max(d_model, d_ff, n_heads * d_head, T) * u

relative to a tensor's scale (its largest |value|; absolute errors of a matmul scale with
its operands, not its result, hence an absolute term for entries that cancel towards 0):
each entry must satisfy |a - b| <= bound * (|b| + scale). For these sizes
bound = 1280 u: 7.6e-5 in float32 and 1.4e-13 in float64 (docs/oracle.md reports the
measured differences: at most ~20 u of the scale).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformer_lens")   # a guard for environments without it: CI installs it ([test] extra)
from safetensors.torch import save_file  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
from transformer_lens.weight_processing import ProcessWeights  # noqa: E402

import refimpl  # noqa: E402
from refimpl import nn  # noqa: E402
from refimpl.cli import main  # noqa: E402
from refimpl.dump import compare_files, dump_tensors, write_dump  # noqa: E402
from tests.helpers import random_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")

FAMILIES = {"gpt2": {}, "llama": {"n_kv_heads": 2, "d_head": 8}}    # llama: 4 query heads, 2 kv heads
DTYPES = {"float32": torch.float32, "float64": torch.float64}
T = 20
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float64": 2.0 ** -53}
TL_ONLY = ("attn.hook_attn_scores", "attn.hook_rot_q", "attn.hook_rot_k", "unembed.hook_in", "unembed.hook_out")


def bound(cfg, dtype: str) -> float:
    """The rounding tolerance of the module docstring, relative to a tensor's scale."""
    n = max(cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.d_head, T)
    return 2 * (9 * cfg.n_layers + 2) * n * UNIT_ROUNDOFF[dtype]


def ours(family: str, dtype: str, **extra):
    """Our random model; float64 runs use float64-stored weights (not float32 numbers), so
    any float32 step on TransformerLens's side shows up as a ~1e-8 difference."""
    return random_model(family, dtype=dtype, store="F64" if dtype == "float64" else "F32",
                        **FAMILIES[family], **extra)


def prompt(model) -> list[int]:
    return [int(i) for i in np.random.default_rng(7).integers(0, model.cfg.d_vocab, T)]


# --- TransformerLens side -------------------------------------------------------------

def tl_config(cfg, dtype: str, **changes) -> HookedTransformerConfig:
    rope = cfg.positions == "rope"
    assert cfg.positions in ("learned", "rope") and cfg.embedding == cfg.unembedding == "linear"
    assert cfg.embed_scale == 1.0 and cfg.final_norm
    kw = dict(
        d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_head=cfg.d_head,
        n_key_value_heads=cfg.n_kv_heads if cfg.n_kv_heads != cfg.n_heads else None,   # as TL's Llama loader
        d_mlp=cfg.d_ff, d_vocab=cfg.d_vocab, n_ctx=cfg.n_ctx, act_fn=cfg.act, eps=cfg.norm_eps,
        normalization_type={"layernorm": "LN", "rmsnorm": "RMS"}[cfg.norm], final_rms=cfg.norm == "rmsnorm",
        positional_embedding_type="rotary" if rope else "standard",
        rotary_dim=cfg.d_head if rope else None, rotary_base=cfg.rope_theta,
        rotary_adjacent_pairs=False, gated_mlp=cfg.gated_ffn,
        original_architecture="LlamaForCausalLM" if rope else "GPT2LMHeadModel",
        default_prepend_bos=False, use_attn_result=True, dtype=DTYPES[dtype], device="cpu",
        init_weights=False)
    kw.update(changes)
    return HookedTransformerConfig(**kw)


def tl_state_dict(model, tl, transform=None) -> dict:
    """Our stored weights under TransformerLens's parameter names.

    Names and shapes are the same (docs/format.md) except: GQA keys/values are TL's
    `_W_K`/`_W_V`/`_b_K`/`_b_V`; the tied `unembed.W_U` is `embed.W_E^T` (resolved by
    `Model.stored`); biases TL has and the model lacks are zeros.
    """
    sd = {}
    for name, p in tl.named_parameters():
        src = name.replace("attn._", "attn.")
        if model.has(src):
            a = np.ascontiguousarray(model.stored(src))
        else:
            assert name.rsplit(".", 1)[1].lstrip("_") in ("b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", "b_U"), name
            a = np.zeros(tuple(p.shape))
        if transform is not None:
            a = transform(name, a)
        sd[name] = torch.tensor(a, dtype=p.dtype)
        assert sd[name].shape == p.shape, (name, sd[name].shape, p.shape)
    return sd


def build_tl(model, dtype: str, transform=None, **changes) -> HookedTransformer:
    """A HookedTransformer with exactly our weights (mapped by `transform`, config fields
    `changes`), loaded the way `from_pretrained_no_processing` loads a checkpoint: no
    LayerNorm folding, no centring, no value-bias folding."""
    tl = HookedTransformer(tl_config(model.cfg, dtype, **changes))
    sd = tl_state_dict(model, tl, transform)
    assert set(sd) == {n for n, _ in tl.named_parameters()}           # every parameter set (init_weights=False)
    tl.load_and_process_state_dict(sd, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False, refactor_factored_attn_matrices=False)
    assert tl.cfg.normalization_type in ("LN", "RMS")                  # nothing folded
    return tl


def tl_run(tl, ids) -> dict[str, np.ndarray]:
    """Every cached hook, batch dimension dropped, plus logits and their log_softmax."""
    with torch.no_grad():
        logits, cache = tl.run_with_cache(torch.tensor([ids]))
    out = {k: v[0].numpy() for k, v in cache.items()}
    out["logits"] = logits[0].numpy()
    out["refimpl.log_probs"] = torch.log_softmax(logits[0], -1).numpy()
    return out


def _process_weights_in_working_dtype(state_dict, cfg, fold_ln=True, center_writing_weights=True,
                                      center_unembed=True, fold_value_biases=True,
                                      refactor_factored_attn_matrices=False, adapter=None):
    """`ProcessWeights.process_weights` (TransformerLens 3.9) without its float32 round trip.

    The original converts every tensor that is not float32 to float32, processes, and
    converts back (meant for bf16/fp16), so a float64 model's weights leave
    `load_and_process_state_dict` - `from_pretrained*` included, even with every flag off -
    rounded to float32. Same steps, same order, no conversion; test_process_weights_patch
    checks it is bit-identical to the original in float32.
    """
    assert adapter is None
    ln = getattr(cfg, "normalization_type", "LN") in ("LN", "LNPre")
    if fold_ln:
        if ln:
            state_dict = ProcessWeights.fold_layer_norm(state_dict, cfg, fold_biases=True, center_weights=True)
        elif getattr(cfg, "normalization_type", "LN") in ("RMS", "RMSPre"):
            state_dict = ProcessWeights.fold_layer_norm(state_dict, cfg, fold_biases=False, center_weights=False)
    if center_writing_weights and ln and not getattr(cfg, "final_rms", False):
        state_dict = ProcessWeights.center_writing_weights(state_dict, cfg)
    if center_unembed:
        state_dict = ProcessWeights.center_unembed(state_dict, cfg=cfg)
    if fold_value_biases:
        state_dict = ProcessWeights.fold_value_biases(state_dict, cfg)
        if center_writing_weights and ln:
            for i in range(cfg.n_layers):
                k = f"blocks.{i}.attn.b_O"
                if k in state_dict:
                    state_dict[k] = state_dict[k] - state_dict[k].mean()
    if refactor_factored_attn_matrices:
        state_dict = ProcessWeights.refactor_factored_attn_matrices(state_dict, cfg)
    return state_dict


@pytest.fixture
def keep_dtype(monkeypatch):
    """Patch TransformerLens's weight processing to keep float64 weights float64."""
    monkeypatch.setattr(ProcessWeights, "process_weights", staticmethod(_process_weights_in_working_dtype))


# --- comparison -----------------------------------------------------------------------

def expected_names(cfg) -> list[str]:
    """Every docs/oracle.md name with a TransformerLens counterpart, for this config."""
    names = ["hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized", "logits", "refimpl.log_probs"]
    if cfg.positions == "learned":
        names.append("hook_pos_embed")
    for i in range(cfg.n_layers):
        names += [f"blocks.{i}.{s}" for s in (
            "hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post",
            "ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale", "ln2.hook_normalized",
            "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "attn.hook_z", "attn.hook_result",
            "mlp.hook_pre", "mlp.hook_post") + (("mlp.hook_pre_linear",) if cfg.gated_ffn else ())]
    return sorted(names)


def our_run(model, ids):
    trace = refimpl.forward(model, ids)
    t, w = len(ids) - 1, int(np.argmax(trace.log_probs[-1]))
    d = dump_tensors(trace, t, w)
    shared = sorted([n for n in d if not n.startswith("refimpl.")] + ["refimpl.log_probs"])
    assert shared == expected_names(model.cfg)
    return trace, t, w, {n: d[n] for n in shared}


def check(theirs: dict, ref: dict, tol: float) -> dict[str, float]:
    """Assert |a - b| <= tol * (|b| + scale) entrywise for every name of `ref`; return
    max |a - b| / scale per name (scale = max |b|)."""
    errs = {}
    for n, b in ref.items():
        assert n in theirs, f"{n}: not in TransformerLens's cache"
        a, b = np.asarray(theirs[n], np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, f"{n}: shape {a.shape} vs {b.shape}"
        scale = max(float(np.abs(b).max()), np.finfo(np.float64).tiny)
        diff = np.abs(a - b)
        bad = ~(diff <= tol * (np.abs(b) + scale))
        if bad.any():
            i = np.unravel_index(int(np.argmax(bad)), bad.shape)
            pytest.fail(f"{n}: |diff| {diff[i]:.3e} at {i} ({a[i]!r} vs {b[i]!r}) exceeds {tol:.1e} * (|b| + {scale:.3g}); "
                        f"max diff / scale {diff.max() / scale:.3e}")
        errs[n] = float(diff.max() / scale)
    return errs


# --- unprocessed: every hook ----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_match_transformer_lens(family, dtype, keep_dtype):
    model = ours(family, dtype)
    ids = prompt(model)
    _, _, _, ref = our_run(model, ids)
    theirs = tl_run(build_tl(model, dtype), ids)
    errs = check(theirs, ref, bound(model.cfg, dtype))
    assert max(errs.values()) > 0                                     # two computations, not one array twice
    if dtype == "float64":
        assert max(errs.values()) <= 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_compare_cli_on_transformer_lens_file(family, dtype, keep_dtype, tmp_path, capsys):
    model = ours(family, dtype)
    ids = prompt(model)
    trace, t, w, ref = our_run(model, ids)
    tl = build_tl(model, dtype)
    with torch.no_grad():
        logits, cache = tl.run_with_cache(torch.tensor([ids]))
    tensors = {k: v[0].clone().contiguous() for k, v in cache.items()}          # every hook, batch dropped
    tensors["logits"] = logits[0].clone()
    tensors["refimpl.log_probs"] = torch.log_softmax(logits[0], -1)
    theirs_file, ours_file = str(tmp_path / "tl.safetensors"), str(tmp_path / "ours.safetensors")
    save_file(tensors, theirs_file)
    write_dump(ours_file, trace, t, w)

    rtol = bound(model.cfg, dtype)
    atol = rtol * max(float(np.abs(v).max()) for v in ref.values())
    args = ["compare", theirs_file, ours_file, "--rtol", repr(rtol), "--atol", repr(atol)]
    assert main(args) == 0
    out = capsys.readouterr().out
    n = len(ref)
    assert f"{n}/{n} shared tensors within" in out
    if dtype == "float64":                                            # also within compare's defaults (1e-10, 1e-12)
        assert main(["compare", theirs_file, ours_file]) == 0
        capsys.readouterr()
    rows, only = compare_files(theirs_file, ours_file, rtol, atol)
    assert sorted(r["name"] for r in rows) == sorted(ref)
    assert all(name.endswith(TL_ONLY) for name in only["only_in_a"]) and only["only_in_a"]
    assert all(name.startswith("refimpl.") for name in only["only_in_b"])

    name, idx = "blocks.1.attn.hook_pattern", (2, T - 3, 4)                 # a key the query sees
    b = float(ref[name][idx])
    delta = 1e-2
    assert delta > 10 * (atol + rtol * abs(b))
    tensors[name] = tensors[name].clone()
    tensors[name][idx] += delta
    save_file(tensors, theirs_file)
    assert main(args) == 1                                              # the exit code: a tolerance exceeded
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
    assert f"FAIL first at {idx}:" in line
    assert f"{n - 1}/{n} shared tensors within" in out


@pytest.mark.parametrize("change", ["eps", "rotary_base"])
def test_float64_needed_to_check_conventions(change, keep_dtype):
    """A 0.1% change of the norm epsilon, or RoPE base 10001 for 10000, hides inside float32
    rounding; the float64 comparison catches it."""
    for dtype in DTYPES:
        model = ours("llama", dtype)
        ids = prompt(model)
        _, _, _, ref = our_run(model, ids)
        value = model.cfg.norm_eps * 1.001 if change == "eps" else model.cfg.rope_theta + 1
        theirs = tl_run(build_tl(model, dtype, **{change: value}), ids)
        if dtype == "float32":
            check(theirs, ref, bound(model.cfg, dtype))
        else:
            with pytest.raises(pytest.fail.Exception):
                check(theirs, ref, bound(model.cfg, dtype))


# --- RoPE convention --------------------------------------------------------------------

def test_rotary_convention_is_half_split(keep_dtype):
    """TL's rotary_adjacent_pairs=False is our half-split RoPE; True is the interleaved
    (GPT-J / Meta) layout, equivalent after permuting each head's q/k dimensions."""
    model = ours("llama", "float64")
    cfg, dh = model.cfg, model.cfg.d_head
    ids = prompt(model)
    trace, _, _, ref = our_run(model, ids)
    tol = bound(cfg, "float64")
    cos, sin = nn.rope_cos_sin(np.arange(T), dh, cfg.rope_theta, np.float64)

    half = tl_run(build_tl(model, "float64"), ids)
    for i, L in enumerate(trace.layers):
        check({"q": half[f"blocks.{i}.attn.hook_rot_q"], "k": half[f"blocks.{i}.attn.hook_rot_k"]},
              {"q": nn.apply_rope(L.q, cos, sin), "k": nn.apply_rope(L.k, cos, sin)}, tol)

    # the same weights under the adjacent-pairs convention: same q, different rotation and pattern
    adj = tl_run(build_tl(model, "float64", rotary_adjacent_pairs=True), ids)
    check({"q": adj["blocks.0.attn.hook_q"]}, {"q": ref["blocks.0.attn.hook_q"]}, tol)
    assert np.abs(adj["blocks.0.attn.hook_rot_q"] - half["blocks.0.attn.hook_rot_q"]).max() > 1e-2
    assert np.abs(adj["blocks.0.attn.hook_pattern"] - ref["blocks.0.attn.hook_pattern"]).max() > 1e-2

    # interleaved weights (dimension i of the half-split layout at 2i, i + dh/2 at 2i + 1):
    # everything agrees except hook_q / hook_k, which are permuted within each head
    perm = np.arange(dh).reshape(2, dh // 2).T.reshape(-1)
    qk = ("attn.W_Q", "attn.b_Q", "attn.W_K", "attn.b_K", "attn._W_K", "attn._b_K")
    inter = tl_run(build_tl(model, "float64", rotary_adjacent_pairs=True,
                            transform=lambda n, a: a[..., perm] if n.endswith(qk) else a), ids)
    permuted = {n: (v[..., perm] if n.endswith(("attn.hook_q", "attn.hook_k")) else v) for n, v in ref.items()}
    check(inter, permuted, tol)
    check({"q": inter["blocks.1.attn.hook_rot_q"]}, {"q": nn.apply_rope(trace.layers[1].q, cos, sin)[..., perm]}, tol)


# --- TransformerLens's weight processing ------------------------------------------------

def _centre(a, axis=-1):
    return a - a.mean(axis, keepdims=True)


def processed_expectation(model, ref: dict) -> tuple[dict, set]:
    """What each hook of a `process_weights_(fold_ln, center_writing_weights, center_unembed)`
    model equals in terms of ours, and the set of hooks that differ from ours."""
    cfg, exp = model.cfg, dict(ref)
    ln = cfg.norm == "layernorm"
    changed = {"logits"}
    exp["logits"] = _centre(ref["logits"])                            # center_unembed: minus the mean over the vocabulary
    if ln:                                                            # center_writing_weights (LayerNorm models only)
        for n in ref:
            if n in ("hook_embed", "hook_pos_embed") or n.split(".")[-1] in (
                    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"):
                exp[n] = _centre(ref[n])                              # minus the per-position mean over d_model
                changed.add(n)
    for i in range(cfg.n_layers):                                     # fold_value_biases (always on in process_weights_)
        b = f"blocks.{i}.attn."
        if model.has(b + "b_V") or model.has(f"blocks.{i}.ln1.b"):
            # the input-independent part of v, b_V + ln1.b W_V (fold_ln moves ln1.b into b_V
            # first), goes into b_O: TL's v is (ln1.hook_normalized * ln1.w) W_V
            b_V = model.weight_or_zeros(b + "b_V", (cfg.n_kv_heads, cfg.d_head))
            if model.has(f"blocks.{i}.ln1.b"):
                b_V = b_V + np.einsum("d,gde->ge", model.weight(f"blocks.{i}.ln1.b"), model.weight(b + "W_V"))
            group = np.arange(cfg.n_heads) // (cfg.n_heads // cfg.n_kv_heads)
            exp[b + "hook_v"] = ref[b + "hook_v"] - b_V
            exp[b + "hook_z"] = ref[b + "hook_z"] - b_V[group]
            res = ref[b + "hook_result"] - np.einsum("he,hed->hd", b_V[group], model.weight(b + "W_O"))
            exp[b + "hook_result"] = _centre(res) if ln else res
            changed |= {b + "hook_v", b + "hook_z", b + "hook_result"}
    return exp, changed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_processed_weights(family, dtype, keep_dtype):
    model = ours(family, dtype)
    ids = prompt(model)
    _, _, _, ref = our_run(model, ids)
    tl = build_tl(model, dtype)
    tl.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    assert tl.cfg.normalization_type == {"layernorm": "LNPre", "rmsnorm": "RMSPre"}[model.cfg.norm]
    theirs = tl_run(tl, ids)
    exp, changed = processed_expectation(model, ref)
    check(theirs, exp, bound(model.cfg, dtype))                       # incl. refimpl.log_probs: log-probs agree
    for n in changed:                                                 # and these really differ from ours
        assert np.abs(theirs[n] - ref[n]).max() > 1e-3 * np.abs(ref[n]).max(), n
    unchanged = set(ref) - changed
    if model.cfg.norm == "layernorm":                                 # GPT-2: exactly these hooks are untouched
        assert unchanged == {"refimpl.log_probs", "ln_final.hook_scale", "ln_final.hook_normalized"} | {
            f"blocks.{i}.{s}" for i in range(model.cfg.n_layers) for s in (
                "ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale", "ln2.hook_normalized",
                "attn.hook_q", "attn.hook_k", "attn.hook_pattern", "mlp.hook_pre", "mlp.hook_post")}
    else:                                                             # Llama: everything but the logits
        assert unchanged == set(ref) - {"logits"}


@pytest.mark.parametrize("family", FAMILIES)
def test_process_weights_patch(family, monkeypatch):
    """The float64-keeping replica of process_weights is bit-identical to TL's in float32,
    and TL's own processing rounds float64 weights to float32 numbers."""
    model = ours(family, "float32")
    a, b = build_tl(model, "float32"), build_tl(model, "float32")
    a.process_weights_()
    with monkeypatch.context() as m:
        m.setattr(ProcessWeights, "process_weights", staticmethod(_process_weights_in_working_dtype))
        b.process_weights_()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k

    model64 = ours(family, "float64")
    tl = build_tl(model64, "float64")                                 # unpatched: a plain no-processing load
    W_E, stored = tl.embed.W_E.detach().numpy(), np.asarray(model64.stored("embed.W_E"))
    assert W_E.dtype == np.float64 and np.array_equal(W_E, stored.astype(np.float32)) and not np.array_equal(W_E, stored)


def test_gated_mlp_bias_convention(keep_dtype):
    """TL's GatedMLP adds b_in after the gating (post = act(x W_gate) * (x W_in) + b_in);
    refimpl adds it to the up projection (m = act(x W_gate) * (x W_in + b_in))."""
    model = ours("llama", "float64", mlp_bias=True)
    ids = prompt(model)
    _, _, _, ref = our_run(model, ids)
    theirs = tl_run(build_tl(model, "float64"), ids)
    b_in = model.weight("blocks.0.mlp.b_in")
    gate, pre = ref["blocks.0.mlp.hook_pre"], ref["blocks.0.mlp.hook_pre_linear"]
    check({k: theirs["blocks.0.mlp." + k] for k in ("hook_pre", "hook_pre_linear", "hook_post")},
          {"hook_pre": gate, "hook_pre_linear": pre - b_in, "hook_post": nn.silu(gate) * (pre - b_in) + b_in},
          bound(model.cfg, "float64"))
    assert np.abs(theirs["blocks.0.hook_mlp_out"] - ref["blocks.0.hook_mlp_out"]).max() > 1e-3
