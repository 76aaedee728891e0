"""Every config value is validated where it enters: at conversion as at load (docs/safety.md).

Numbers must be finite and in range (epsilons, RoPE base, multipliers, factors, sizes); the
configuration must explain exactly the tensors present (a layer beyond n_layers, a bias the
flags say is absent, a tensor stored twice across shards: errors, never ignored or "the later
one wins"); shard indexes are type-checked. Every failure is one error line, exit 2, and a
refused conversion leaves nothing behind (tests.test_robustness.expect_convert_refused).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from refimpl.safetensors_io import read_header, spec_of, write_safetensors
from refimpl.synthetic import random_config, write_random_model
from tests.conftest import FIXTURES
from tests.test_robustness import (assert_one_error_line, cli, expect_convert_refused, hf_gpt2_dir, hf_llama_dir,
                                   meta_dir)


def _edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))          # allow_nan: NaN/Infinity are written as JSON's extensions


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1e-5, 1e300])
def test_hf_gpt2_layer_norm_epsilon(tmp_path, capfd, value):
    """On main NaN/Infinity passed the converter and were written into config.json."""
    src = hf_gpt2_dir(tmp_path / "src")
    _edit_json(src / "config.json", layer_norm_epsilon=value)
    expect_convert_refused(capfd, tmp_path, src, "layer_norm_epsilon")


@pytest.mark.parametrize("key,value", [("rms_norm_eps", float("nan")), ("rms_norm_eps", float("inf")),
                                       ("rope_theta", float("nan")), ("rope_theta", float("inf")),
                                       ("rope_theta", -10000.0)])
def test_hf_llama_numbers(tmp_path, capfd, key, value):
    src = hf_llama_dir(tmp_path / "src")
    _edit_json(src / "config.json", **{key: value})
    expect_convert_refused(capfd, tmp_path, src, key)


@pytest.mark.parametrize("key,value", [("ffn_dim_multiplier", float("inf")), ("ffn_dim_multiplier", float("nan")),
                                       ("ffn_dim_multiplier", 1e308), ("norm_eps", float("nan")),
                                       ("rope_theta", float("inf")), ("rope_theta", float("nan"))])
def test_meta_params(tmp_path, capfd, key, value):
    """On main ffn_dim_multiplier Infinity/NaN/1e308 were tracebacks, NaN norm_eps/rope_theta were written."""
    src = meta_dir(tmp_path / "src")
    _edit_json(src / "params.json", **{key: value})
    expect_convert_refused(capfd, tmp_path, src, key)


def _fairseq(tmp_path, **model_options):
    torch = pytest.importorskip("torch")
    from omegaconf import OmegaConf
    ck = torch.load(FIXTURES / "fairseq_tiny" / "new" / "model.pt", weights_only=False)
    ck["cfg"] = OmegaConf.to_container(ck["cfg"])
    ck["cfg"]["model"].update(model_options)
    d = tmp_path / "fs"
    d.mkdir()
    torch.save(ck, d / "model.pt")
    shutil.copy(FIXTURES / "fairseq_tiny" / "new" / "dict.txt", d / "dict.txt")
    return d


@pytest.mark.parametrize("key,value", [("adaptive_input_factor", 1e-170), ("adaptive_input_factor", 1e308),
                                       ("adaptive_input_factor", float("nan")), ("adaptive_softmax_factor", float("inf")),
                                       ("adaptive_input_factor", 1e-3)])
def test_fairseq_adaptive_factors(tmp_path, capfd, key, value):
    """On main adaptive_input_factor 1e-170 was a traceback (float floor division by zero)."""
    src = _fairseq(tmp_path, **{key: value})
    expect_convert_refused(capfd, tmp_path, src, "model.pt")


def test_the_writer_refuses_a_config_that_loading_would_refuse(tmp_path):
    """Whatever a converter hands over is validated as `refimpl.load` validates it, before writing."""
    from refimpl.errors import FormatError
    from refimpl.writer import Planned, write_canonical
    cfg = random_config("gpt2", d_vocab=10, n_ctx=4, n_layers=1, d_model=8, n_heads=2, d_ff=8).to_dict()
    from refimpl.synthetic import tensor_shapes, word_tokenizer_json
    from refimpl.config import Config
    shapes = tensor_shapes(Config.from_dict(cfg))
    plan = [Planned(n, s, "F32", lambda s=s: np.zeros(s, np.float32)) for n, s in shapes.items()]
    tok = word_tokenizer_json([f"w{i}" for i in range(10)])
    for bad in ({"norm_eps": float("nan")}, {"rope_theta": float("inf")}, {"n_layers": 2}, {"padding_idx": 10},
                {"embed_scale": float("nan")}, {"special_tokens": {"unk": 99}}):
        with pytest.raises(FormatError, match="conversion refused"):
            write_canonical(str(tmp_path / "out"), {**cfg, **bad}, plan, tok, sources=[], source_format="test")
        assert list(tmp_path.iterdir()) == []
    extra = plan + [Planned("blocks.0.attn.W_extra", (2,), "F32", lambda: np.zeros(2, np.float32))]
    with pytest.raises(FormatError, match="W_extra"):
        write_canonical(str(tmp_path / "out"), cfg, extra, tok, sources=[], source_format="test")
    write_canonical(str(tmp_path / "out"), cfg, plan, tok, sources=[], source_format="test")


# --------------------------------------------------------------------------- loading


@pytest.fixture
def llama4(tmp_path):
    d = tmp_path / "m"
    write_random_model(str(d), random_config("llama", n_layers=4, d_vocab=30, n_ctx=16), seed=7)
    return d


def _cfg(d, **changes):
    p = d / "config.json"
    c = json.loads(p.read_text())
    c.update(changes)
    c.pop("config_sha256", None)
    p.write_text(json.dumps(c))


def test_fewer_layers_in_config_than_in_the_weights(capfd, llama4):
    """On main, n_layers 3 on a 4-layer checkpoint silently ran a truncated model."""
    _cfg(llama4, n_layers=3)
    rc, _, err = cli(capfd, "locate", "--model", llama4, "--ids", "1,2,3")
    assert_one_error_line(rc, err, "n_layers=3", "layer 3")


@pytest.mark.parametrize("changes,needle", [
    ({"norm_eps": float("nan")}, "norm_eps"), ({"norm_eps": float("inf")}, "norm_eps"), ({"norm_eps": 5.0}, "norm_eps"),
    ({"rope_theta": float("nan")}, "rope_theta"), ({"rope_theta": 0}, "rope_theta"),
    ({"embed_scale": float("inf")}, "embed_scale"), ({"special_tokens": {"unk": 10**9}}, "special_tokens"),
    ({"special_tokens": {"unk": "zero"}}, "special_tokens"), ({"format_version": 2}, "format_version"),
    ({"prepend_ids": [1] * 1000}, "prepend_ids"), ({"n_ctx": 2**40}, "n_ctx")])
def test_config_numbers_at_load(capfd, llama4, changes, needle):
    _cfg(llama4, **changes)
    rc, _, err = cli(capfd, "layers", "--model", llama4, "--ids", "1,2,3")
    assert_one_error_line(rc, err, needle)


def _rewrite(path, edit):
    """Rewrite a safetensors file with `edit({name: array})`."""
    tensors, meta = read_header(str(path))
    arrays = edit({n: np.array(t.numpy()) for n, t in tensors.items()})
    names = list(arrays)
    path.unlink()
    write_safetensors(str(path), [spec_of(n, arrays[n]) for n in names], ((n, arrays[n]) for n in names), meta)


def test_a_tensor_the_config_does_not_explain(tmp_path, capfd, llama4):
    _rewrite(llama4 / "model.safetensors", lambda a: {**a, "ln_final.b": np.zeros(16, np.float32)})
    rc, _, err = cli(capfd, "layers", "--model", llama4, "--ids", "1,2,3")
    assert_one_error_line(rc, err, "ln_final.b", "not used")             # an RMSNorm has no bias
    g = tmp_path / "g"                                                   # tied embeddings: no unembed.W_U stored
    write_random_model(str(g), random_config("gpt2", d_vocab=20, n_ctx=8, n_layers=1), seed=1)
    _rewrite(g / "model.safetensors", lambda a: {**a, "unembed.W_U": np.zeros((16, 20), np.float32),
                                                 "blocks.0.attn.W_extra": np.zeros(2, np.float32)})
    rc, _, err = cli(capfd, "layers", "--model", g, "--ids", "1,2,3")
    assert_one_error_line(rc, err, "W_extra", "and 1 more", "not used")


def test_bias_flags_must_match_the_tensors(capfd, llama4):
    _cfg(llama4, attn_bias=True)
    rc, _, err = cli(capfd, "layers", "--model", llama4, "--ids", "1,2,3")
    assert_one_error_line(rc, err, "attn_bias=true")


def _shard(d, move: list[str], dup: list[str] = (), index_edit=None):
    """Split model.safetensors into two shards (`move` into the second, `dup` into both) + an index."""
    tensors, _ = read_header(str(d / "model.safetensors"))
    arrays = {n: np.array(t.numpy()) for n, t in tensors.items()}
    a = {n: v for n, v in arrays.items() if n not in move}
    b = {n: arrays[n] for n in list(move) + list(dup)}
    files = {"model-00001-of-00002.safetensors": a, "model-00002-of-00002.safetensors": b}
    for f, arrs in files.items():
        names = list(arrs)
        write_safetensors(str(d / f), [spec_of(n, arrs[n]) for n in names], ((n, arrs[n]) for n in names))
    (d / "model.safetensors").unlink()
    wm = {n: f for f, arrs in files.items() for n in arrs}
    index = {"metadata": {}, "weight_map": wm}
    if index_edit:
        index_edit(index)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    c = json.loads((d / "config.json").read_text())
    c["files"] = {}                                 # the record no longer matters for these checks
    (d / "config.json").write_text(json.dumps(c))


def test_sharded_model_still_loads(capfd, llama4):
    _shard(llama4, ["blocks.3.mlp.W_out", "ln_final.w"])
    assert cli(capfd, "layers", "--model", llama4, "--ids", "1,2,3")[0] == 0


def test_the_same_tensor_in_two_shards_is_an_error(capfd, llama4):
    """On main the later shard silently won."""
    _shard(llama4, ["blocks.3.mlp.W_out"], dup=["blocks.0.mlp.W_in"])
    rc, _, err = cli(capfd, "layers", "--model", llama4, "--ids", "1,2,3")
    assert_one_error_line(rc, err, "blocks.0.mlp.W_in")


@pytest.mark.parametrize("how", ["number", "all-numbers", "list", "null", "path", "no-map", "wrong-shard",
                                 "unlisted"])
def test_shard_index_is_type_checked(capfd, llama4, how):
    """On main a weight_map value that is a number was a traceback."""
    def edit(index):
        wm = index["weight_map"]
        if how == "number":
            wm["blocks.3.mlp.W_out"] = 5
        elif how == "all-numbers":
            index["weight_map"] = {k: 1 for k in wm}
        elif how == "list":
            wm["blocks.3.mlp.W_out"] = ["model-00002-of-00002.safetensors"]
        elif how == "null":
            wm["ln_final.w"] = None
        elif how == "path":
            wm["ln_final.w"] = "../model-00002-of-00002.safetensors"
        elif how == "no-map":
            index["weight_map"] = [1, 2]
        elif how == "wrong-shard":
            wm["ln_final.w"] = "model-00001-of-00002.safetensors"
        else:
            del wm["ln_final.w"]
    _shard(llama4, ["blocks.3.mlp.W_out", "ln_final.w"], index_edit=edit)
    rc, _, err = cli(capfd, "layers", "--model", llama4, "--ids", "1,2,3")
    assert_one_error_line(rc, err, "model.safetensors.index.json")
