#!/usr/bin/env python
"""Build the real-fairseq oracle fixture ``tests/fixtures/fairseq_tiny``.

This script is NOT part of the test suite and is not importable without fairseq:
it needs a separate virtualenv with real fairseq (see the fixture README), e.g.

    python3 -m venv ../venv-fairseq
    ../venv-fairseq/bin/pip install torch==2.13.0
    ../venv-fairseq/bin/pip install fairseq-fixed==0.12.3.1
    ../venv-fairseq/bin/pip uninstall -y torchaudio   # pulled in, broken, unused
    ../venv-fairseq/bin/python tests/oracles/make_fairseq_fixture.py

It builds a tiny ``transformer_lm_wiki103`` language model (Baevski & Auli adaptive
input + tied adaptive softmax) with fairseq's own code, fills every parameter with
seeded random values (layer norms and biases included, so every term matters), writes
three checkpoints that fairseq itself loads back, and records fairseq's own float64
outputs (next-token log-probabilities, residual stream per layer, ...) in
``expected.npz``.  An independent NumPy forward pass written from the semantics listed
in the README is checked against fairseq here, so the README's description of
fairseq's maths is verified, not guessed.

Variants (same weights in all three):
  old/        2019-style: top level ``args`` (argparse.Namespace) + ``model``;
              ``decoder.version`` = 2 (exercises fairseq's "version <= 2: no final
              norm" upgrade path) and the old ``decoder.embed_positions._float_tensor``
              buffer; attention stored
              fused as ``in_proj_weight``/``in_proj_bias`` (rows [q; k; v]);
              legacy (non-zip) torch serialisation.
  new/        ``args: None`` + ``cfg`` as an omegaconf DictConfig (fairseq 0.10-style
              hydra checkpoint), separate q/k/v, zip serialisation.
  new_plain/  ``cfg`` as a plain nested dict (what fairseq 0.12's Trainer.state_dict
              writes: OmegaConf.to_container), separate q/k/v, zip serialisation.
"""

import argparse
import collections
import copy
import hashlib
import io
import json
import math
import os
import pickletools
import shutil
import sys
import tempfile
import zipfile

# fairseq's checkpoint loader calls torch.load without weights_only; torch >= 2.6
# defaults to weights_only=True, which refuses argparse.Namespace / DictConfig.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import logging

logging.disable(logging.WARNING)
import warnings

warnings.filterwarnings("ignore")

import numpy as np
import torch

import fairseq
from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models.transformer_lm import TransformerLanguageModel
from omegaconf import OmegaConf

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "fairseq_tiny")
WIKI103_DICT = os.path.join(REPO, "tests", "fixtures", "tokenizers", "wiki103", "dict.txt")

SEED = 20240611
N_WORDS = 96  # + 4 specials = 100 symbols
D, FFN, HEADS, LAYERS = 32, 64, 4, 2
CUTOFF = "20,60"

# The first 96 lines of the real fairseq WikiText-103 dict.txt (word, count), so that
# ids 4..99 are the real wiki103 ids of these words.  Embedded so that the script does
# not depend on the full dictionary being present.
FIRST_WIKI103_LINES = """the 5584823
, 4971506
. 3624899
of 2737620
and 2499539
to 1979164
in 1894558
a 1677048
= 1466599
" 1338685
was 1075325
@-@ 881576
The 853819
's 728291
on 688528
that 679711
for 675287
as 675032
with 632025
by 600898
) 583875
( 583522
is 512782
his 436363
from 431900
at 417082
were 354550
it 326416
he 318305
an 306216
had 292528
In 281598
which 275598
be 235033
but 203336
are 203212
not 194870
; 191058
first 189667
their 186430
– 185670
: 181247
also 179733
her 176758
its 174862
or 166456
have 163459
one 163454
@.@ 158057
two 156709
who 155431
been 152103
has 150736
@,@ 149068
this 145573
He 141128
' 138306
they 135556
after 130319
would 126371
time 124383
into 123422
It 119260
1 115844
other 113966
more 110018
I 109467
when 102051
she 100733
him 99837
over 99818
all 97887
during 96296
A 96183
only 93734
2 92977
up 91793
out 90597
about 90225
than 90191
game 89732
between 88286
later 87322
three 87015
most 84554
while 83599
new 81803
On 80455
made 78025
film 76980
3 76901
000 75611
such 75220
season 74378
where 74305
before 73776
"""

# Prompts: text (whitespace-split words, like wikitext-103) -> ids via fairseq's
# Dictionary.encode_line(..., append_eos=False), with </s> (id 2) prepended as
# fairseq's LM scoring does.  Unknown words ("said", "s") map to <unk> = 3.
PROMPTS = [
    "",
    "The film",
    "It was the first season of the game , she said",
    "He later made that film for his new season before the first game ' s time ; it was 3 000 over",
]

# the real fairseq wiki103 training command (examples/language_model/README.adaptive_inputs.md),
# with tiny sizes appended
TRAIN_ARGV = [
    "--task", "language_modeling",
    "--arch", "transformer_lm_wiki103",
    "--max-update", "286000", "--lr", "1.0", "--t-mult", "2",
    "--lr-period-updates", "270000", "--lr-scheduler", "cosine", "--lr-shrink", "0.75",
    "--warmup-updates", "16000", "--warmup-init-lr", "1e-07", "--stop-min-lr", "1e-09",
    "--optimizer", "nag", "--min-lr", "0.0001", "--clip-norm", "0.1",
    "--criterion", "adaptive_loss", "--max-tokens", "3072", "--update-freq", "3",
    "--tokens-per-sample", "3072", "--seed", "1", "--sample-break-mode", "none",
    "--skip-invalid-size-inputs-valid-test", "--ddp-backend=legacy_ddp",
    # tiny model
    "--decoder-layers", str(LAYERS), "--decoder-embed-dim", str(D),
    "--decoder-input-dim", str(D), "--decoder-output-dim", str(D),
    "--decoder-ffn-embed-dim", str(FFN), "--decoder-attention-heads", str(HEADS),
    "--adaptive-input-cutoff", CUTOFF, "--adaptive-softmax-cutoff", CUTOFF,
    "--cpu",
]


# ----------------------------------------------------------------------------- build


def write_dict(path):
    lines = FIRST_WIKI103_LINES.strip("\n").split("\n")
    assert len(lines) == N_WORDS
    if os.path.exists(WIKI103_DICT):  # cross-check against the real file when present
        with open(WIKI103_DICT, encoding="utf-8") as f:
            real = [next(f).rstrip("\n") for _ in range(N_WORDS)]
        assert real == lines, "embedded dict lines differ from the real wiki103 dict.txt"
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def build_model(data_dir):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=[data_dir] + TRAIN_ARGV)
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return args, cfg, task, model


def randomise_(model, seed):
    """Seeded non-trivial values for every parameter (tied ones are filled once)."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float64)

    seen = set()
    with torch.no_grad():
        # named_parameters() yields each shared Parameter once (first name wins:
        # decoder.embed_tokens.*), so tied softmax weights follow automatically.
        for name, p in model.named_parameters():
            assert id(p) not in seen
            seen.add(id(p))
            if "layer_norm" in name and name.endswith("weight"):
                v = 1.0 + 0.3 * randn(p.shape)
            elif name.endswith("bias"):
                v = 0.2 * randn(p.shape)
            elif "embed_tokens.embeddings" in name and name.endswith(".0.weight"):
                # nn.Embedding [n, d_c]; std d**-0.5 in every band, so that after the
                # projection (std d_c**-0.5) and the sqrt(d) scale each band's token
                # vectors have unit-size components and the log-probs stay realistic.
                # The padding row (id 1 of band 0) is randomised too:
                # nn.Embedding(padding_idx) does not zero it in forward (it only gets
                # no gradient), so a converter must keep it verbatim.
                v = randn(p.shape) * D**-0.5
            else:  # nn.Linear weight [out, in]
                v = randn(p.shape) * p.shape[1] ** -0.5
            p.copy_(v.to(p.dtype))
        # dummy buffers created with torch.FloatTensor(1) hold uninitialised memory
        for name, b in model.named_buffers():
            if name.endswith("_float_tensor"):
                b.zero_()


def fuse_qkv(sd):
    """Write the state dict as fairseq <= 0.8 did: self_attn.in_proj_weight = [q; k; v]."""
    out = collections.OrderedDict()
    done = set()
    for k, v in sd.items():
        if ".self_attn." in k and k.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj"):
            prefix = k[: k.index(".self_attn.") + len(".self_attn.")]
            if prefix in done:
                continue
            done.add(prefix)
            out[prefix + "in_proj_weight"] = torch.cat(
                [sd[prefix + p + ".weight"] for p in ("q_proj", "k_proj", "v_proj")], 0
            ).clone()
            out[prefix + "in_proj_bias"] = torch.cat(
                [sd[prefix + p + ".bias"] for p in ("q_proj", "k_proj", "v_proj")], 0
            ).clone()
        else:
            out[k] = v
        if k == "decoder.embed_tokens.embeddings.2.1.weight":
            # old SinusoidalPositionalEmbedding registered a persistent dummy buffer;
            # fairseq 0.12 deletes this key on load
            out["decoder.embed_positions._float_tensor"] = torch.FloatTensor([0.0])
    if hasattr(sd, "_metadata"):
        out._metadata = copy.deepcopy(sd._metadata)
    return out


def old_style_args(args):
    """The argparse.Namespace as fairseq-train stored it (all fields, modern
    spelling).  NB: the 2019 spelling ``no_tie_adaptive_proj=False`` (without
    ``tie_adaptive_proj``) is NOT honoured by fairseq 0.12's loader
    (convert_namespace_to_omegaconf drops the unknown field, the tail projections are
    then built untied and load_state_dict fails on the [d, d_c] vs [d_c, d] shapes), so
    the modern fields are kept."""
    a = copy.deepcopy(args)
    a.data = "data-bin/wikitext-103"
    return a


def training_state():
    return dict(
        optimizer_history=[
            {
                "criterion_name": "AdaptiveLoss",
                "optimizer_name": "FairseqNAG",
                "lr_scheduler_state": {"best": 2.9},
                "num_updates": 286000,
            }
        ],
        extra_state={
            "epoch": 1,
            "val_loss": 2.9,
            "train_iterator": {"epoch": 1, "iterations_in_epoch": 0},
        },
    )


# --------------------------------------------------------------------------- outputs


def sinusoid_table_f64(n, d, padding_idx):
    """fairseq's SinusoidalPositionalEmbedding.get_embedding formula, in float64."""
    half = d // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float64) * -step)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * freqs[None, :]
    t = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)
    if d % 2 == 1:
        t = torch.cat([t, torch.zeros(n, 1, dtype=torch.float64)], dim=1)
    t[padding_idx] = 0
    return t


def run_fairseq(model, ids):
    """fairseq's own float64 forward: everything comes from fairseq modules."""
    dec = model.decoder
    tokens = torch.tensor([ids], dtype=torch.long)
    mids = []
    hooks = [
        layer.final_layer_norm.register_forward_pre_hook(
            lambda m, inp: mids.append(inp[0][:, 0, :].clone())
        )
        for layer in dec.layers
    ]
    try:
        with torch.no_grad():
            net_out = model(tokens)
            lp = model.get_normalized_probs(net_out, log_probs=True)[0]
            feats = net_out[0][0]
            tok = dec.embed_scale * dec.embed_tokens(tokens)[0]
            pos = dec.embed_positions(tokens)[0]
            head = dec.adaptive_softmax.head(feats)
            tails = [t(feats) for t in dec.adaptive_softmax.tail]
    finally:
        for h in hooks:
            h.remove()
    inner = torch.stack([s[:, 0, :] for s in net_out[1]["inner_states"]])
    return dict(
        log_probs=lp.numpy(),
        inner_states=inner.numpy(),
        resid_mid=torch.stack(mids).numpy(),
        tok_embed=tok.numpy(),
        pos_embed=pos.numpy(),
        head_out=head.numpy(),
        tails=[t.numpy() for t in tails],
    )


# ---------------------------------------------------------- independent NumPy oracle


def numpy_forward(sd, ids, pos_table, cutoffs, n_layers, n_heads):
    """Forward pass written only from the semantics documented in the README."""
    W = {k: v.double().numpy() for k, v in sd.items() if v.is_floating_point()}
    d = W["decoder.embed_tokens.embeddings.0.1.weight"].shape[0]
    dh = d // n_heads
    bands = [0] + list(cutoffs)
    T = len(ids)

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * W[p + ".weight"] + W[p + ".bias"]

    def lsm(z):
        m = z.max(-1, keepdims=True)
        return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))

    x = np.zeros((T, d))
    for t, i in enumerate(ids):
        c = next(c for c in range(len(cutoffs)) if i < cutoffs[c])
        E = W[f"decoder.embed_tokens.embeddings.{c}.0.weight"]  # [n_c, d_c]
        P = W[f"decoder.embed_tokens.embeddings.{c}.1.weight"]  # [d, d_c] (nn.Linear)
        x[t] = math.sqrt(d) * (E[i - bands[c]] @ P.T)
    x = x + pos_table[2 : 2 + T]  # positions padding_idx+1 = 2, 3, ...
    inner = [x]
    for i in range(n_layers):
        p = f"decoder.layers.{i}."
        h = ln(x, p + "self_attn_layer_norm")
        if p + "self_attn.in_proj_weight" in W:
            Wqkv, bqkv = W[p + "self_attn.in_proj_weight"], W[p + "self_attn.in_proj_bias"]
            Wq, Wk, Wv = Wqkv[:d], Wqkv[d : 2 * d], Wqkv[2 * d :]
            bq, bk, bv = bqkv[:d], bqkv[d : 2 * d], bqkv[2 * d :]
        else:
            Wq, Wk, Wv = (W[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
            bq, bk, bv = (W[p + f"self_attn.{n}_proj.bias"] for n in "qkv")
        q = (h @ Wq.T + bq) * dh**-0.5
        k = h @ Wk.T + bk
        v = h @ Wv.T + bv
        q, k, v = (a.reshape(T, n_heads, dh).transpose(1, 0, 2) for a in (q, k, v))
        s = q @ k.transpose(0, 2, 1) + np.triu(np.full((T, T), -np.inf), 1)
        a = np.exp(lsm(s))
        o = (a @ v).transpose(1, 0, 2).reshape(T, d)
        x = x + o @ W[p + "self_attn.out_proj.weight"].T + W[p + "self_attn.out_proj.bias"]
        h = ln(x, p + "final_layer_norm")  # the PRE-FFN norm
        f = np.maximum(h @ W[p + "fc1.weight"].T + W[p + "fc1.bias"], 0.0)
        x = x + f @ W[p + "fc2.weight"].T + W[p + "fc2.bias"]
        inner.append(x)
    # no decoder.layer_norm; adaptive softmax, all weights from the adaptive input
    E0 = W["decoder.embed_tokens.embeddings.0.0.weight"]
    head = np.concatenate([x @ E0.T, x @ W["decoder.adaptive_softmax.head.class_proj.weight"].T], 1)
    hl = lsm(head)
    n0 = cutoffs[0]
    out = [hl[:, :n0]]
    for c in range(1, len(cutoffs)):
        E = W[f"decoder.embed_tokens.embeddings.{c}.0.weight"]
        P = W[f"decoder.embed_tokens.embeddings.{c}.1.weight"]  # [d, d_c]
        z = (x @ P) @ E.T  # TiedLinear(P, transpose=True) then TiedLinear(E)
        out.append(lsm(z) + hl[:, n0 + c - 1 : n0 + c])
    return np.concatenate(out, 1), np.stack(inner)


# ------------------------------------------------------------------------ reporting


def pickle_globals(path):
    """The GLOBAL/STACK_GLOBAL names in a checkpoint's pickle (what a torch-free reader
    must be able to resolve)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
            streams = [io.BytesIO(z.read(name))]
    else:
        # legacy torch.save: pickles of magic number, protocol version, sys_info and
        # the main object, then a pickled list of storage keys, then raw storages.
        # genops only parses (nothing is executed) and stops after each STOP.
        buf = io.BytesIO(raw)
        streams = [buf] * 5
    names = set()
    for s in streams:
        strings = []
        for op, arg, pos in pickletools.genops(s):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(arg)
            if op.name == "GLOBAL":
                names.add(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                names.add(strings[-2] + "." + strings[-1])
    return sorted(names)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


# ----------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=SEED)
    opts = ap.parse_args()
    out = os.path.abspath(opts.out)

    torch.manual_seed(opts.seed)
    tmp = tempfile.mkdtemp(prefix="fairseq_tiny_")
    try:
        write_dict(os.path.join(tmp, "dict.txt"))
        args, cfg, task, model = build_model(tmp)
        dictionary = task.source_dictionary
        V = len(dictionary)
        assert V == N_WORDS + 4, V
        assert (dictionary.bos(), dictionary.pad(), dictionary.eos(), dictionary.unk()) == (0, 1, 2, 3)
        randomise_(model, opts.seed)
        model.eval()

        dec = model.decoder
        cutoffs = list(dec.adaptive_softmax.cutoff)
        assert cutoffs == list(dec.embed_tokens.cutoff) == [20, 60, V], cutoffs
        assert dec.layer_norm is None and dec.embed_scale == math.sqrt(D)
        assert dec.embed_positions.padding_idx == 1

        # the data path is a temporary directory: store the real run's path instead,
        # so that the checkpoints are byte-reproducible
        cfg_saved = copy.deepcopy(cfg)
        cfg_saved.task.data = "data-bin/wikitext-103"

        sd = model.state_dict()
        sd_old = fuse_qkv(sd)
        sd_old["decoder.version"] = torch.Tensor([2.0])  # see README: exercised on purpose

        os.makedirs(out, exist_ok=True)
        for sub in ("old", "new", "new_plain"):
            shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
            os.makedirs(os.path.join(out, sub))
            shutil.copy(os.path.join(tmp, "dict.txt"), os.path.join(out, sub, "dict.txt"))
        shutil.copy(os.path.join(tmp, "dict.txt"), os.path.join(out, "dict.txt"))

        ckpts = {
            "old": (
                {"args": old_style_args(args), "model": sd_old, **training_state()},
                dict(_use_new_zipfile_serialization=False),
            ),
            "new": (
                {"args": None, "cfg": cfg_saved, "model": sd, "criterion": {}, "task_state": {},
                 **training_state()},
                {},
            ),
            "new_plain": (
                {"args": None,
                 "cfg": OmegaConf.to_container(cfg_saved, resolve=True, enum_to_str=True),
                 "model": sd, "criterion": {}, "task_state": {}, **training_state()},
                {},
            ),
        }
        for name, (state, kw) in ckpts.items():
            path = os.path.join(out, name, "model.pt")
            torch.save(state, path, **kw)
            with open(path, "rb") as f:
                assert tmp.encode() not in f.read(), f"{name}: temporary path leaked"

        # ---- fairseq's own float64 outputs, from the in-memory model
        md = copy.deepcopy(model)
        md.double()
        md.eval()
        a_s = md.decoder.adaptive_softmax
        e_t = md.decoder.embed_tokens
        assert a_s.head.word_proj.weight is e_t.embeddings[0][0].weight
        for c in (1, 2):
            assert a_s.tail[c - 1][0].weight is e_t.embeddings[c][1].weight
            assert a_s.tail[c - 1][2].weight is e_t.embeddings[c][0].weight

        T_max = 1 + max(len(p.split()) for p in PROMPTS)
        n_tab = 2 + T_max
        stock_table = md.decoder.embed_positions.weights[:n_tab].clone()
        f64_table = sinusoid_table_f64(md.decoder.embed_positions.weights.shape[0], D, 1)
        md64 = copy.deepcopy(md)
        md64.decoder.embed_positions.weights = f64_table.clone()

        arrays = {
            "cutoffs": np.array(cutoffs, dtype=np.int64),
            "pos_table_stock": stock_table.numpy(),
            "pos_table_f64": f64_table[:n_tab].numpy(),
        }
        prompts_meta = []
        for k, text in enumerate(PROMPTS):
            body = dictionary.encode_line(text, add_if_not_exist=False, append_eos=False).long().tolist()
            ids = [dictionary.eos()] + body
            prompts_meta.append({"k": k, "text": text, "ids": ids})
            arrays[f"ids_{k}"] = np.array(ids, dtype=np.int64)
            r = run_fairseq(md, ids)
            r64 = run_fairseq(md64, ids)
            for key in ("log_probs", "inner_states", "resid_mid", "tok_embed", "pos_embed", "head_out"):
                arrays[f"{key}_{k}"] = r[key]
            for c, t in enumerate(r["tails"], start=1):
                arrays[f"tail_out_{k}_{c}"] = t
            for key in ("log_probs", "inner_states", "resid_mid"):
                arrays[f"{key}_pos64_{k}"] = r64[key]

            # sanity: positions, probabilities, non-degenerate outputs
            assert np.array_equal(r["pos_embed"], stock_table[2 : 2 + len(ids)].numpy())
            assert np.abs(np.exp(r["log_probs"]).sum(-1) - 1).max() < 1e-12
            assert np.array_equal(r["inner_states"][0], r["tok_embed"] + r["pos_embed"])

            # independent NumPy oracle (README semantics) vs fairseq, both tables
            worst = 0.0
            for tab, rr, label in ((stock_table.numpy(), r, "stock"), (f64_table.numpy(), r64, "pos64")):
                for which, state_dict in (("sep", sd), ("fused", sd_old)):
                    lp, inner = numpy_forward(state_dict, ids, tab, cutoffs, LAYERS, HEADS)
                    e1 = np.abs(lp - rr["log_probs"]).max()
                    e2 = np.abs(inner - rr["inner_states"]).max()
                    assert e1 < 1e-11 and e2 < 1e-11, (k, label, which, e1, e2)
                    worst = max(worst, e1, e2)
            print(f"prompt {k}: T={len(ids)} ids={ids}")
            print(f"   numpy-oracle vs fairseq: max abs diff {worst:.1e}; log_probs range "
                  f"[{r['log_probs'].min():.2f}, {r['log_probs'].max():.2f}], "
                  f"|stock - pos64| log_probs {np.abs(r['log_probs'] - r64['log_probs']).max():.2e}")

        # ---- fairseq loads every checkpoint back (offline) and reproduces the outputs
        for name in ckpts:
            hub = TransformerLanguageModel.from_pretrained(os.path.join(out, name), "model.pt")
            m = hub.models[0]
            m.double()
            m.eval()  # (fairseq's train() override returns None: do not chain)
            assert m.decoder.layer_norm is None
            ad = m.decoder.adaptive_softmax
            assert type(ad.tail[0][0]).__name__ == "TiedLinear", f"{name}: adaptive proj not tied"
            assert ad.head.word_proj.weight is m.decoder.embed_tokens.embeddings[0][0].weight
            for k in range(len(PROMPTS)):
                r = run_fairseq(m, arrays[f"ids_{k}"].tolist())
                for key in ("log_probs", "inner_states"):
                    err = np.abs(r[key] - arrays[f"{key}_{k}"]).max()
                    assert err == 0.0, (name, k, key, err)
            print(f"{name}: fairseq from_pretrained reload reproduces expected outputs exactly")

        np.savez_compressed(os.path.join(out, "expected.npz"), **arrays)

        # ---- manifest for the README
        manifest = {
            "fairseq_version": fairseq.__version__,
            "torch_version": torch.__version__,
            "numpy_version": np.__version__,
            "seed": opts.seed,
            "vocab_size": V,
            "cutoffs": cutoffs,
            "d_model": D, "d_ff": FFN, "n_heads": HEADS, "n_layers": LAYERS,
            "band_dims": [e[0].weight.shape[1] for e in model.decoder.embed_tokens.embeddings],
            "prompts": prompts_meta,
            "variants": {},
        }
        for name, (state, _) in ckpts.items():
            path = os.path.join(out, name, "model.pt")
            loaded = torch.load(path, map_location="cpu", weights_only=False)
            msd = loaded["model"]
            ptr = {}
            keys = []
            for key, v in msd.items():
                p = v.untyped_storage().data_ptr()
                keys.append({
                    "key": key, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
                    "shares_storage_with": ptr.get(p),
                })
                ptr.setdefault(p, key)
            manifest["variants"][name] = {
                "top_level_keys": list(loaded.keys()),
                "format": "zip" if open(path, "rb").read(2) == b"PK" else "legacy",
                "bytes": os.path.getsize(path),
                "sha256": sha256(path),
                "pickle_globals": pickle_globals(path),
                "model_keys": keys,
            }
        with open(os.path.join(out, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print("wrote", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
