"""HF GPT-2, HF Llama and Meta LLaMA converters against the real library.

Tiny random models are built with transformers (every norm weight/bias and every bias
randomised), saved with the library's own functions in every layout we accept
(save_pretrained single and sharded safetensors; torch.save .bin in zip and legacy
serialization; sharded .bin with its index; fp32/fp16/bf16; GPT-2 with and without the
`transformer.` prefix), converted with auto-detection, loaded in float64 and compared with
transformers run in float64 on the same (rounded) weights: per-layer residual stream and
log-probs to <= 1e-12 max abs (measured: ~1e-14). See tests/hf_oracle.py for the float64 patches applied
to transformers' Llama.
"""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import converters  # noqa: E402
import refimpl  # noqa: E402
from converters.common import half_to_interleaved, interleaved_to_half  # noqa: E402
from converters.meta_llama import ffn_hidden_dim  # noqa: E402
from refimpl.cli import main as cli_main  # noqa: E402
from refimpl.errors import FormatError, RefimplError  # noqa: E402
from refimpl.safetensors_io import read_header  # noqa: E402
from refimpl.synthetic import word_tokenizer_json  # noqa: E402
from tests import hf_oracle as O  # noqa: E402
from tests.conftest import FIXTURES  # noqa: E402

TOL = 1e-12
GPT2_TOK = FIXTURES / "tokenizers" / "gpt2"
LLAMA_TOK = FIXTURES / "tokenizers" / "llama" / "tokenizer.model"
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def word_tok(vocab):
    return word_tokenizer_json([f"w{i}" for i in range(vocab)])


def id_seqs(vocab, n_ctx, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(rng.integers(vocab))], rng.integers(0, vocab, 7).tolist(), rng.integers(0, vocab, n_ctx).tolist()]


def check_against_library(model_dir, hf_model, vocab, n_ctx, label):
    """Convert-side model vs the library in float64; returns the max differences."""
    m = refimpl.load(model_dir, dtype="float64")
    worst = {"residual": 0.0, "log_probs": 0.0}
    for ids in id_seqs(vocab, n_ctx):
        d = O.compare(refimpl.run(m, ids), O.reference(hf_model, ids))
        worst = {k: max(worst[k], d[k]) for k in worst}
    print(f"\n{label}: max |diff| residual {worst['residual']:.2e}, log-probs {worst['log_probs']:.2e}")
    assert worst["log_probs"] <= TOL, (label, worst)
    assert worst["residual"] <= TOL, (label, worst)
    return worst


def bits(a):
    return np.asarray(a).view(np.uint16 if np.asarray(a).dtype.itemsize == 2 else np.uint32)


# --- GPT-2 ------------------------------------------------------------------------------------

GPT2_CASES = [
    # (id, save layout, dtype, torch.save options)
    ("safetensors-f32", "safetensors", "f32", {}),
    ("safetensors-sharded-f32", "safetensors-sharded", "f32", {}),
    ("safetensors-f16", "safetensors", "f16", {}),
    ("bin-zip-f32-prefixed", "bin-zip", "f32", {}),
    ("bin-zip-f16-noprefix", "bin-zip", "f16", {"strip": True}),
    ("bin-legacy-f32-noprefix-buffers", "bin-legacy", "f32", {"strip": True, "buffers": True}),
    ("bin-sharded-f32", "bin-sharded", "f32", {}),
]


def gpt2_save_kwargs(m, opts):
    kw = {}
    if opts.get("strip"):      # GPT2Model-style keys, no lm_head (like openai-community/gpt2's .bin)
        kw["strip_prefix"] = "transformer."
        kw["drop"] = ("lm_head.weight",)
    if opts.get("buffers"):    # the causal-mask buffers old checkpoints carry
        n = m.config.n_positions
        kw["extra"] = {}
        for i in range(m.config.n_layer):
            kw["extra"][f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, n, n))
            kw["extra"][f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return kw


@pytest.fixture(scope="module")
def gpt2_model():
    return O.tiny_gpt2(vocab=100, seed=1)


@pytest.mark.parametrize("case", GPT2_CASES, ids=[c[0] for c in GPT2_CASES])
def test_gpt2_formats(tmp_path, gpt2_model, case):
    label, how, dt, opts = case
    m = O.rounded(gpt2_model, DTYPES[dt])
    src = O.save(m, str(tmp_path / "src"), how, **gpt2_save_kwargs(m, opts))
    (tmp_path / "src" / "tokenizer.json").write_text(word_tok(100))
    if how == "safetensors-sharded":
        assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    assert converters.detect_format(src) == "hf-gpt2"
    out = converters.convert(src, str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["family"] == "gpt2" and cfg["act"] == "gelu_new" and cfg["tie_word_embeddings"] is True
    assert cfg["prepend_ids"] == [] and cfg["attn_bias"] and cfg["mlp_bias"] and cfg["n_ctx"] == 16
    assert cfg["special_tokens"] == {"bos": 99, "eos": 99}
    tensors = read_header(os.path.join(out, "model.safetensors"))[0]
    assert tensors["embed.W_E"].dtype == {"f32": "F32", "f16": "F16"}[dt]
    assert "unembed.W_U" not in tensors
    # stored bits are the source's bits (no round trip through another precision)
    wte = m.transformer.wte.weight.detach().numpy()
    assert np.array_equal(bits(tensors["embed.W_E"].raw()), bits(wte))
    assert (tmp_path / "out" / "tokenizer.json").read_text() == word_tok(100)
    check_against_library(out, m, 100, 16, f"hf-gpt2 {label}")


def test_gpt2_untied_exact_gelu_and_eps(tmp_path):
    m = O.tiny_gpt2(vocab=100, seed=2, tie_word_embeddings=False, activation_function="gelu",
                    layer_norm_epsilon=1e-3, n_inner=40)
    assert not torch.equal(m.lm_head.weight, m.transformer.wte.weight)
    src = O.save(m, str(tmp_path / "src"), "safetensors")
    (tmp_path / "src" / "tokenizer.json").write_text(word_tok(100))
    out = converters.convert(src, str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["act"] == "gelu" and cfg["norm_eps"] == 1e-3
    assert cfg["d_ff"] == 40
    assert "unembed.W_U" in read_header(os.path.join(out, "model.safetensors"))[0]
    check_against_library(out, m, 100, 16, "hf-gpt2 untied, gelu (erf), eps 1e-3, n_inner 40")


def test_gpt2_full_vocab_with_vocab_json_merges(tmp_path):
    """vocab 50257 with OpenAI's vocab.json + merges.txt (tokenizer converted, not copied)."""
    m = O.tiny_gpt2(vocab=50257, seed=3)
    src = O.save(m, str(tmp_path / "src"), "safetensors")
    shutil.copy(GPT2_TOK / "encoder.json", tmp_path / "src" / "vocab.json")
    shutil.copy(GPT2_TOK / "vocab.bpe", tmp_path / "src" / "merges.txt")
    out = converters.convert(src, str(tmp_path / "out"))
    model = refimpl.load(out)
    assert model.cfg.special_tokens == {"bos": 50256, "eos": 50256}
    assert model.encode("Hello world") == [15496, 995]          # GPT-2's own ids, no BOS
    check_against_library(out, m, 50257, 16, "hf-gpt2 vocab 50257, vocab.json+merges.txt")


@pytest.mark.parametrize("key,value,match", [
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx"),
    ("scale_attn_weights", False, "scale_attn_weights"),
    ("activation_function", "swish_weird", "activation_function"),
])
def test_gpt2_refuses_other_maths(tmp_path, gpt2_model, key, value, match):
    src = O.save(gpt2_model, str(tmp_path / "src"), "safetensors")
    (tmp_path / "src" / "tokenizer.json").write_text(word_tok(100))
    cfg_path = tmp_path / "src" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[key] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(RefimplError, match=match):
        converters.convert(src, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# --- Llama --------------------------------------------------------------------------------------

LLAMA_CASES = [
    ("safetensors-f32", "safetensors", "f32"),
    ("safetensors-sharded-f32", "safetensors-sharded", "f32"),
    ("safetensors-f16", "safetensors", "f16"),
    ("safetensors-bf16", "safetensors", "bf16"),
    ("safetensors-sharded-bf16", "safetensors-sharded", "bf16"),
    ("bin-zip-f32", "bin-zip", "f32"),
    ("bin-zip-bf16", "bin-zip", "bf16"),
    ("bin-legacy-f16", "bin-legacy", "f16"),
    ("bin-sharded-f32", "bin-sharded", "f32"),
]


@pytest.fixture(scope="module")
def llama_model():
    return O.tiny_llama(vocab=100, seed=4)


@pytest.mark.parametrize("case", LLAMA_CASES, ids=[c[0] for c in LLAMA_CASES])
def test_llama_formats(tmp_path, llama_model, case):
    label, how, dt = case
    m = O.rounded(llama_model, DTYPES[dt])
    src = O.save(m, str(tmp_path / "src"), how)
    (tmp_path / "src" / "tokenizer.json").write_text(word_tok(100))
    assert converters.detect_format(src) == "hf-llama"
    out = converters.convert(src, str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["family"], cfg["n_heads"], cfg["n_kv_heads"], cfg["d_head"]) == ("llama", 4, 2, 8)
    assert cfg["prepend_ids"] == [1] and cfg["tie_word_embeddings"] is False and cfg["norm_eps"] == 1e-5
    assert cfg["special_tokens"] == {"bos": 1, "eos": 2}
    tensors = {}
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            tensors.update(read_header(os.path.join(out, f))[0])
    want = {"f32": "F32", "f16": "F16", "bf16": "BF16"}[dt]
    assert {t.dtype for t in tensors.values()} == {want}
    # bit-exact: BF16 stays raw bits, q/k rows are NOT permuted (HF is already half-split)
    q = m.model.layers[1].self_attn.q_proj.weight.detach()
    q_bits = (q.view(torch.int16).numpy().view(np.uint16) if dt == "bf16" else bits(q.numpy()))
    assert np.array_equal(bits(tensors["blocks.1.attn.W_Q"].raw()), q_bits.reshape(4, 8, 32).transpose(0, 2, 1))
    check_against_library(out, m, 100, 16, f"hf-llama {label}")


@pytest.mark.parametrize("variant", ["attention_bias+head_dim16+theta500", "tied", "mlp_bias(gate zero)"])
def test_llama_variants(tmp_path, variant):
    if variant.startswith("attention_bias"):
        m = O.tiny_llama(vocab=100, seed=5, attention_bias=True, head_dim=16, rope_theta=500.0,
                         rms_norm_eps=1e-6)
    elif variant == "tied":
        m = O.tiny_llama(vocab=100, seed=6, tie_word_embeddings=True)
        m.tie_weights()
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    else:
        m = O.tiny_llama(vocab=100, seed=7, mlp_bias=True)
        with torch.no_grad():
            for layer in m.model.layers:
                layer.mlp.gate_proj.bias.zero_()
    src = O.save(m, str(tmp_path / "src"), "safetensors")
    (tmp_path / "src" / "tokenizer.json").write_text(word_tok(100))
    out = converters.convert(src, str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    if variant.startswith("attention_bias"):
        assert cfg["attn_bias"] and cfg["d_head"] == 16 and cfg["rope_theta"] == 500.0 and cfg["norm_eps"] == 1e-6
    elif variant == "tied":
        assert cfg["tie_word_embeddings"] is True
    else:
        assert cfg["mlp_bias"]
    check_against_library(out, m, 100, 16, f"hf-llama {variant}")


def test_llama_refuses_nonzero_gate_bias_and_rope_scaling(tmp_path):
    m = O.tiny_llama(vocab=100, seed=8, mlp_bias=True)
    src = O.save(m, str(tmp_path / "a"), "safetensors")
    (tmp_path / "a" / "tokenizer.json").write_text(word_tok(100))
    with pytest.raises(FormatError, match="gate_proj.bias"):
        converters.convert(src, str(tmp_path / "out"))
    m = O.tiny_llama(vocab=100, seed=8)
    src = O.save(m, str(tmp_path / "b"), "safetensors")
    (tmp_path / "b" / "tokenizer.json").write_text(word_tok(100))
    cfg_path = tmp_path / "b" / "config.json"
    for patch in ({"rope_scaling": {"type": "linear", "factor": 2.0}},
                  {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}}):
        cfg = json.loads(cfg_path.read_text())
        cfg.update(patch)
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(FormatError, match="RoPE"):
            converters.convert(src, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_llama_tokenizer_model_and_stale_inv_freq(tmp_path):
    """vocab 32000 with LLaMA's tokenizer.model; an old .bin carrying rotary_emb.inv_freq."""
    from converters.tokenizers import llama_tokenizer_json
    m = O.tiny_llama(vocab=32000, seed=9)
    extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.arange(4, dtype=torch.float32)
             for i in range(2)}
    src = O.save(m, str(tmp_path / "src"), "bin-zip", extra=extra)
    shutil.copy(LLAMA_TOK, tmp_path / "src" / "tokenizer.model")
    out = converters.convert(src, str(tmp_path / "out"))
    model = refimpl.load(out)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == llama_tokenizer_json(str(LLAMA_TOK))[0]
    assert model.encode("Hello world")[0] == 1
    check_against_library(out, m, 32000, 16, "hf-llama vocab 32000, tokenizer.model, inv_freq buffers")


# --- Meta LLaMA ------------------------------------------------------------------------------------

def test_ffn_hidden_dim_matches_meta_models():
    assert ffn_hidden_dim(4096, 256, None) == 11008       # LLaMA 7B
    assert ffn_hidden_dim(5120, 256, None) == 13824       # 13B
    assert ffn_hidden_dim(6656, 256, None) == 17920       # 33B
    assert ffn_hidden_dim(8192, 256, None) == 22016       # 65B
    assert ffn_hidden_dim(8192, 4096, 1.3) == 28672       # Llama-2 70B


def test_meta_rope_convention():
    """Meta's interleaved-pair RoPE (complex multiply, as in llama/model.py) on the Meta rows
    equals HF's rotate_half RoPE on the `interleaved_to_half`-permuted rows."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    H, dh, d, T = 2, 8, 16, 5
    g = torch.Generator().manual_seed(0)
    wq_meta = torch.randn(H * dh, d, generator=g, dtype=torch.float64)
    x = torch.randn(T, d, generator=g, dtype=torch.float64)
    freqs = 1.0 / (10000.0 ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
    ang = torch.outer(torch.arange(T, dtype=torch.float64), freqs)                  # [T, dh/2]
    q = (x @ wq_meta.T).reshape(T, H, dh // 2, 2)
    q_meta = torch.view_as_real(torch.view_as_complex(q.contiguous()) * torch.polar(torch.ones_like(ang), ang)[:, None])
    q_meta = q_meta.reshape(T, H, dh)
    wq_hf = torch.from_numpy(interleaved_to_half(wq_meta.numpy(), H))
    qh = (x @ wq_hf.T).reshape(1, T, H, dh).transpose(1, 2)                         # [1, H, T, dh]
    emb = torch.cat((ang, ang), -1)[None]
    q_hf, _ = apply_rotary_pos_emb(qh, qh, emb.cos(), emb.sin())
    q_hf = q_hf[0].transpose(0, 1)                                                  # [T, H, dh]
    # same rotated vector, up to the per-head permutation of its coordinates
    perm = torch.from_numpy(interleaved_to_half(np.arange(H * dh, dtype=np.float64)[:, None], H)[:, 0]).long()
    assert torch.allclose(q_meta.reshape(T, H * dh)[:, perm], q_hf.reshape(T, H * dh), atol=1e-12)


def write_meta_checkpoint(m, d, n_shards=2, dtype=torch.float32, vocab_size=-1, multiple_of=16,
                          ffn_dim_multiplier=1.3):
    """Invert the HF conversion of LlamaForCausalLM `m`: Meta names, interleaved q/k rows,
    model-parallel shards split as Meta's layers split them."""
    c = m.config
    H, Hk, L = c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers
    sd = {k: v.detach().to(dtype) for k, v in m.state_dict().items()}

    def perm(w, n):
        if w.dtype == torch.bfloat16:
            b = w.view(torch.int16).numpy()
            return torch.from_numpy(np.ascontiguousarray(half_to_interleaved(b, n))).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(half_to_interleaved(w.numpy(), n)))
    full = {"tok_embeddings.weight": (sd["model.embed_tokens.weight"], 1),
            "norm.weight": (sd["model.norm.weight"], None),
            "output.weight": (sd["lm_head.weight"], 0)}
    for i in range(L):
        p = f"model.layers.{i}."
        full.update({
            f"layers.{i}.attention.wq.weight": (perm(sd[p + "self_attn.q_proj.weight"], H), 0),
            f"layers.{i}.attention.wk.weight": (perm(sd[p + "self_attn.k_proj.weight"], Hk), 0),
            f"layers.{i}.attention.wv.weight": (sd[p + "self_attn.v_proj.weight"], 0),
            f"layers.{i}.attention.wo.weight": (sd[p + "self_attn.o_proj.weight"], 1),
            f"layers.{i}.feed_forward.w1.weight": (sd[p + "mlp.gate_proj.weight"], 0),
            f"layers.{i}.feed_forward.w2.weight": (sd[p + "mlp.down_proj.weight"], 1),
            f"layers.{i}.feed_forward.w3.weight": (sd[p + "mlp.up_proj.weight"], 0),
            f"layers.{i}.attention_norm.weight": (sd[p + "input_layernorm.weight"], None),
            f"layers.{i}.ffn_norm.weight": (sd[p + "post_attention_layernorm.weight"], None),
        })
    dh = c.hidden_size // H
    rope = 1.0 / (c.rope_parameters["rope_theta"] ** (torch.arange(0, dh, 2).float() / dh))
    os.makedirs(d, exist_ok=True)
    for s in range(n_shards):
        shard = {}
        for k, (w, dim) in full.items():
            shard[k] = w.clone() if dim is None else torch.chunk(w, n_shards, dim=dim)[s].clone()
        shard["rope.freqs"] = rope.to(dtype)
        torch.save(shard, os.path.join(d, f"consolidated.{s:02d}.pth"))
    params = {"dim": c.hidden_size, "n_layers": L, "n_heads": H, "n_kv_heads": Hk,
              "vocab_size": vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": ffn_dim_multiplier,
              "norm_eps": c.rms_norm_eps}
    with open(os.path.join(d, "params.json"), "w") as f:
        json.dump(params, f)
    return d


@pytest.mark.parametrize("dt", ["f32", "bf16"])
def test_meta_two_shards(tmp_path, dt):
    dim, mult, mo = 32, 1.3, 16
    F = ffn_hidden_dim(dim, mo, mult)                        # int(1.3 * int(2*128/3)) = 110 -> 112
    assert F == 112
    m = O.tiny_llama(vocab=32000, seed=10, hidden_size=dim, intermediate_size=F)
    m = O.rounded(m, DTYPES[dt])
    src = write_meta_checkpoint(m, str(tmp_path / "llama" / "tiny"), dtype=DTYPES[dt], multiple_of=mo,
                                ffn_dim_multiplier=mult)
    shutil.copy(LLAMA_TOK, tmp_path / "llama" / "tokenizer.model")      # Meta layout: beside the model dirs
    assert converters.detect_format(src) == "meta-llama"
    out = converters.convert(src, str(tmp_path / "out"))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["d_ff"], cfg["d_vocab"], cfg["n_kv_heads"], cfg["prepend_ids"]) == (112, 32000, 2, [1])
    assert [f["name"] for f in cfg["source"]["files"]] == ["params.json", "consolidated.00.pth",
                                                          "consolidated.01.pth", "tokenizer.model"]
    emb = read_header(os.path.join(out, "model.safetensors"))[0]["embed.W_E"]
    assert emb.dtype == {"f32": "F32", "bf16": "BF16"}[dt]
    check_against_library(out, m, 32000, 16, f"meta-llama 2 shards {dt}")


def test_meta_hidden_size_mismatch_is_refused(tmp_path):
    m = O.tiny_llama(vocab=32000, seed=11, intermediate_size=112)
    src = write_meta_checkpoint(m, str(tmp_path / "m"), n_shards=1, multiple_of=16, ffn_dim_multiplier=None)
    shutil.copy(LLAMA_TOK, tmp_path / "m" / "tokenizer.model")
    with pytest.raises(FormatError, match="hidden size of 96"):
        converters.convert(src, str(tmp_path / "out"))


# --- detection, CLI, provenance -------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, gpt2_model):
    d = str(tmp_path_factory.mktemp("cli") / "gpt2")
    O.save(gpt2_model, d, "safetensors")
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        f.write(word_tok(100))
    return d


def test_detection_does_not_confuse_formats(gpt2_dir, tmp_path, llama_model):
    from converters import hf_gpt2, hf_llama, meta_llama
    llama = O.save(llama_model, str(tmp_path / "llama"), "safetensors")
    assert hf_gpt2.detect(gpt2_dir) and not hf_llama.detect(gpt2_dir) and not meta_llama.detect(gpt2_dir)
    assert hf_llama.detect(llama) and not hf_gpt2.detect(llama) and not meta_llama.detect(llama)
    stories = str(FIXTURES / "stories260K" / "stories260K.bin")
    for mod in (hf_gpt2, hf_llama, meta_llama):
        assert not mod.detect(stories) and not mod.detect(str(tmp_path / "nonexistent"))


def test_cli_convert_and_source_hashes(gpt2_dir, tmp_path, capsys):
    dst = str(tmp_path / "out")
    assert cli_main(["convert", gpt2_dir, dst]) == 0
    assert "gpt2 (hf-gpt2)" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    files = {f["name"]: f for f in cfg["source"]["files"]}
    assert set(files) == {"config.json", "model.safetensors", "tokenizer.json"}
    for name, f in files.items():
        data = open(os.path.join(gpt2_dir, name), "rb").read()
        assert f["sha256"] == hashlib.sha256(data).hexdigest() and f["bytes"] == len(data)
    assert cli_main(["verify", dst]) == 0


def test_cli_refuses_non_empty_destination(gpt2_dir, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    assert cli_main(["convert", gpt2_dir, str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err
    assert os.listdir(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "precious"
    assert cli_main(["convert", gpt2_dir, str(dst), "--force"]) == 0
    assert "keep.txt" not in os.listdir(dst) and (dst / "config.json").exists()


@pytest.mark.parametrize("damage", ["corrupt", "missing", "not-an-object"])
@pytest.mark.parametrize("fmt", [None, "hf-gpt2", "hf-llama"])
def test_cli_bad_config_json(gpt2_dir, tmp_path, capsys, damage, fmt):
    src = tmp_path / "src"
    shutil.copytree(gpt2_dir, src)
    if damage == "corrupt":
        (src / "config.json").write_text('{"model_type": "gpt2", "n_embd": ')
    elif damage == "missing":
        (src / "config.json").unlink()
    else:
        (src / "config.json").write_text("[1, 2]")
    argv = ["convert", str(src), str(tmp_path / "out")] + (["--format", fmt] if fmt else [])
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "config.json" in err, err
    assert not (tmp_path / "out").exists()


def test_bin_and_pth_convert_with_torch_blocked(tmp_path, llama_model):
    """.bin (legacy serialization) and Meta .pth shards convert with torch unimportable."""
    import subprocess
    import sys
    hf = O.save(O.rounded(llama_model, torch.bfloat16), str(tmp_path / "hf"), "bin-legacy")
    (tmp_path / "hf" / "tokenizer.json").write_text(word_tok(100))
    m = O.tiny_llama(vocab=32000, seed=12, intermediate_size=112)
    meta = write_meta_checkpoint(m, str(tmp_path / "meta"), dtype=torch.float16)
    shutil.copy(LLAMA_TOK, tmp_path / "meta" / "tokenizer.model")
    script = f"""
import sys
for name in ("torch", "transformers"):
    sys.modules[name] = None
import converters, refimpl
for src, dst in (({hf!r}, {str(tmp_path / 'o1')!r}), ({meta!r}, {str(tmp_path / 'o2')!r})):
    refimpl.run(refimpl.load(converters.convert(src, dst)), [1, 2, 3])
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(O.ROOT))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
