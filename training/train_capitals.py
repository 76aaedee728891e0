"""Train the embedded model `capitals-gpt2`: a small GPT-2 that knows capitals and cities.

    pip install torch==2.13.0 && pip install -e '.[train]'
    python training/train_capitals.py --out /tmp/capitals-hf --convert-to refimpl/data/models/capitals-gpt2

Builds the corpus and tokenizer (make_corpus.py), trains a Hugging Face `GPT2LMHeadModel`
with torch on CPU, prints the training curve and a held-out accuracy table, and saves the
checkpoint (config.json with model_type gpt2, model.safetensors in float32, tokenizer.json)
to --out. With --convert-to it then converts that checkpoint with the project's own
converter (`converters.convert`) into a canonical refimpl model directory.

Sentences are trained one per row, exactly as refimpl prompts GPT-2: no start token, the
first word at position 0, `<|endoftext|>` after the final "." and as padding (no loss on
padding). Seeded and deterministic: the data order comes from a seeded torch.Generator, the
weights from torch.manual_seed; dropout is off.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_corpus as MC  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Train the embedded capitals-gpt2 model (see training/README.md).")
    ap.add_argument("--out", required=True, help="directory for the Hugging Face checkpoint")
    ap.add_argument("--convert-to", default=None, metavar="DIR",
                    help="also convert the checkpoint to a canonical refimpl model directory (replaced if present)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus-seed", type=int, default=MC.SEED)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine 2 threads were 3-20x slower)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine schedule floor, as a fraction of --lr")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-inner", type=int, default=512)
    ap.add_argument("--n-positions", type=int, default=64)
    ap.add_argument("--log-every", type=int, default=250)
    ap.add_argument("--eval-every", type=int, default=500, help="print the paper-template accuracy every N steps (0: only at the end)")
    return ap.parse_args(argv)


def encode_rows(tok, sentences, eos_id):
    """[N, T] ids (sentence + EOS, right-padded with EOS) and labels (-100 on padding)."""
    import torch
    seqs = [tok.encode(s, add_special_tokens=False).ids + [eos_id] for s in sentences]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), eos_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        labels[r, :len(s)] = torch.tensor(s)
    return ids, labels


def predict_next(model, tok, prompts, eos_id, batch=512):
    """Greedy next-token id after each prompt (no start token, as refimpl runs GPT-2)."""
    import torch
    out = []
    model.eval()
    with torch.no_grad():
        for b in range(0, len(prompts), batch):
            seqs = [tok.encode(p, add_special_tokens=False).ids for p in prompts[b:b + batch]]
            T = max(map(len, seqs))
            ids = torch.full((len(seqs), T), eos_id, dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, :len(s)] = torch.tensor(s)
            logits = model(input_ids=ids).logits
            last = torch.tensor([len(s) - 1 for s in seqs])
            out += logits[torch.arange(len(seqs)), last].argmax(-1).tolist()
    model.train()
    return out


def accuracy_table(model, tok, rows, eos_id):
    """Top-1 next-word accuracy per (relation, template, split)."""
    preds = predict_next(model, tok, [r["prompt"] for r in rows], eos_id)
    acc = defaultdict(lambda: [0, 0])
    for r, p in zip(rows, preds):
        ok = p == tok.token_to_id(r["target"])
        for key in ((r["relation"], r["template"], r["split"]), (r["relation"], "*", r["split"])):
            acc[key][0] += ok
            acc[key][1] += 1
    return acc


def format_table(acc) -> str:
    lines = [f"{'relation':<11} {'template':<34} {'train':>14} {'held-out':>14} {'unseen':>14}"]
    keys = sorted({(k[0], k[1]) for k in acc}, key=lambda k: (list(MC.TEMPLATES).index(k[0]), k[1] == "*",
                                                                [t[0] for t in MC.TEMPLATES[k[0]]].index(k[1]) if k[1] != "*" else 0))
    for rel, tmpl in keys:
        cells = []
        for split in ("train", "heldout", "unseen"):
            n_ok, n = acc.get((rel, tmpl, split), (0, 0))
            cells.append(f"{n_ok:>4}/{n:<4} {100 * n_ok / n:5.1f}%" if n else f"{'-':>14}")
        name = "(all templates)" if tmpl == "*" else tmpl
        lines.append(f"{rel:<11} {name:<34} " + " ".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)


def paper_accuracy(model, tok, rows, eos_id) -> tuple[float, float]:
    """The quality bar: "The capital of X is" over all countries, "Y is located in the country of" over all cities."""
    out = []
    for tmpl in ("capital_of_X_is", "Y_located_in_country_of"):
        sel = [r for r in rows if r["template"] == tmpl]
        preds = predict_next(model, tok, [r["prompt"] for r in sel], eos_id)
        out.append(sum(p == tok.token_to_id(r["target"]) for r, p in zip(sel, preds)) / len(sel))
    return out[0], out[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel
    transformers.logging.set_verbosity_error()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    sentences, rows = MC.corpus(args.corpus_seed)
    tok = MC.build_tokenizer(sentences)
    MC.check_tokenizer(tok, rows, sentences)
    eos_id = tok.token_to_id(MC.EOS)
    ids, labels = encode_rows(tok, sentences, eos_id)
    n_tokens = int((labels != -100).sum())
    V = tok.get_vocab_size()
    print(f"corpus: {len(sentences)} sentences, {n_tokens} tokens (with EOS), longest {ids.shape[1]}; "
          f"vocabulary {V}; fact rows: " + ", ".join(f"{k} {sum(r['split'] == k for r in rows)}"
                                                     for k in ("train", "heldout", "unseen")), flush=True)
    if ids.shape[1] > args.n_positions:
        raise SystemExit(f"longest sentence ({ids.shape[1]} tokens) exceeds --n-positions {args.n_positions}")

    cfg = GPT2Config(vocab_size=V, n_positions=args.n_positions, n_embd=args.n_embd, n_layer=args.n_layer,
                     n_head=args.n_head, n_inner=args.n_inner, activation_function="gelu_new",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                     bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, tie_word_embeddings=True)
    model = GPT2LMHeadModel(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: GPT-2, {args.n_layer} layers, d_model {args.n_embd}, {args.n_head} heads, d_ff {args.n_inner}, "
          f"n_positions {args.n_positions}, tied embeddings: {n_params} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-8)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        q = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * q)))

    gen = torch.Generator().manual_seed(args.seed)
    lengths = (labels != -100).sum(1)

    def epoch_batches():
        """One epoch in a seeded order: shuffle, sort each run of 32 batches by length (less padding),
        cut into batches, shuffle the batches."""
        perm = torch.randperm(len(ids), generator=gen)
        chunk = 32 * args.batch_size
        batches = []
        for c in range(0, len(perm), chunk):
            part = perm[c:c + chunk]
            part = part[torch.sort(lengths[part], stable=True).indices]
            batches += [part[b:b + args.batch_size] for b in range(0, len(part), args.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]

    batches, pos, epoch = epoch_batches(), 0, 0
    print(f"training: {args.steps} steps, batch {args.batch_size} sentences, AdamW lr {args.lr} "
          f"(warmup {args.warmup}, cosine to {args.min_lr_ratio * args.lr:g}), weight decay {args.weight_decay}, "
          f"{args.threads} threads", flush=True)
    print(f"{'step':>6} {'epoch':>6} {'loss':>8} {'lr':>9} {'seconds':>8}", flush=True)
    model.train()
    t0, run_loss, run_n = time.perf_counter(), 0.0, 0
    for step in range(args.steps):
        if pos == len(batches):
            batches, pos, epoch = epoch_batches(), 0, epoch + 1
        idx = batches[pos]
        pos += 1
        x, y = ids[idx], labels[idx]
        T = int((y != -100).sum(1).max())          # trim the batch to its longest sentence
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=x[:, :T], labels=y[:, :T]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run_loss, run_n = run_loss + loss.item(), run_n + 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            print(f"{step + 1:>6} {epoch + pos / len(batches):>6.1f} {run_loss / run_n:>8.4f} {lr_at(step):>9.2e} "
                  f"{time.perf_counter() - t0:>8.1f}", flush=True)
            run_loss, run_n = 0.0, 0
        if args.eval_every and (step + 1) % args.eval_every == 0:
            c, y_ = paper_accuracy(model, tok, rows, eos_id)
            print(f"        paper templates: capital {100 * c:.1f}%  city->country {100 * y_:.1f}%", flush=True)
    train_seconds = time.perf_counter() - t0

    model.eval()
    acc = accuracy_table(model, tok, rows, eos_id)
    print("\nnext-word top-1 accuracy (train: trained sentences; held-out: facts trained in other templates "
          "only; unseen: a template never trained)")
    print(format_table(acc))
    cap, city = paper_accuracy(model, tok, rows, eos_id)
    print(f"\nquality bar (transformers forward): 'The capital of X is' {100 * cap:.1f}% of "
          f"{sum(r['template'] == 'capital_of_X_is' for r in rows)} countries; 'Y is located in the country of' "
          f"{100 * city:.1f}% of {sum(r['template'] == 'Y_located_in_country_of' for r in rows)} cities")

    os.makedirs(args.out, exist_ok=True)
    model.to(torch.float32).save_pretrained(args.out, safe_serialization=True)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    summary = {"train_seconds": round(train_seconds, 1), "total_seconds": round(time.perf_counter() - t_start, 1),
               "parameters": n_params, "vocab": V, "sentences": len(sentences), "tokens": n_tokens,
               "paper_capital_accuracy": cap, "paper_city_accuracy": city, "args": vars(args),
               "torch": torch.__version__}
    with open(os.path.join(args.out, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nsaved {args.out}; training {train_seconds:.0f} s, total {summary['total_seconds']:.0f} s", flush=True)

    if args.convert_to:
        sys.path.insert(0, os.path.dirname(HERE))
        import converters
        out = converters.convert(args.out, args.convert_to, fmt="hf-gpt2", force=True)
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(f"converted to {out} ({size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
