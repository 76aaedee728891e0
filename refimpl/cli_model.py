"""Model subcommands: convert, verify, predict, models, prepare."""
from __future__ import annotations

import os

import numpy as np

from .cli_common import command, common, emit, model_options, open_model, positive_int, prepare
from .errors import RefimplError


@command("convert", "convert a checkpoint (llama2.c, HF GPT-2/Llama, Meta LLaMA, fairseq) to the canonical format")
def cmd_convert(p, args=None):
    if args is None:
        p.add_argument("src", help="checkpoint file or directory")
        p.add_argument("dst", help="output model directory (must be absent or empty; see --force)")
        p.add_argument("--format", dest="fmt", default=None, metavar="FORMAT",
                       help="source format: llama2c, hf-gpt2, hf-llama, meta-llama or fairseq (default: detected "
                            "from the files)")
        p.add_argument("--tokenizer", default=None,
                       help="tokenizer file, where the format needs one (llama2.c; default: found beside SRC)")
        p.add_argument("--force", action="store_true",
                       help="replace DST if it is a model converted by refimpl (never other content)")
        p.add_argument("--quiet", action="store_true", help="no progress on stderr")
        return
    import converters
    from . import progress
    from .files import read_json
    with progress.reporting(progress.Progress("convert", quiet=args.quiet)) as prog:
        try:
            out = converters.convert(args.src, args.dst, fmt=args.fmt, force=args.force, tokenizer=args.tokenizer)
        except KeyboardInterrupt as e:
            e.hint = f"nothing was written to {args.dst}"
            raise
        prog.done()
    cfg = read_json(os.path.join(out, "config.json"))
    print(f"wrote {out}: {cfg['family']} ({cfg['source']['format']}), {cfg['n_layers']} layers, "
          f"d_model {cfg['d_model']}, vocabulary {cfg['d_vocab']}")


@command("verify", "re-hash a converted model directory (and its cache/) against the hashes recorded when written")
def cmd_verify(p, args=None):
    if args is None:
        p.add_argument("model", help="converted model directory")
        p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
        return
    from .files import printable
    from .verify import verify
    notes: list = []
    problems = verify(args.model, notes)
    if args.json:
        emit(args, {"path": os.path.abspath(args.model), "ok": not problems, "problems": problems}, "")
    else:
        for line in notes + problems:
            print(printable(line))
    if problems:
        raise RefimplError(f"{args.model}: {len(problems)} file(s) failed verification")
    if not args.json:
        print(f"{printable(args.model)}: all files match their recorded sha256")


@command("predict", "run a prompt and print the next-token distribution at the analysed position")
def cmd_predict(p, args=None):
    if args is None:
        common(p, readout=False)
        p.add_argument("--top", type=positive_int, default=10, help="K most probable next tokens")
        p.add_argument("--generate", type=positive_int, default=None, metavar="N",
                       help="also greedy-decode up to N tokens after the prompt (stops at the end-of-text token "
                            "or the context length)")
        return
    from . import display
    from .forward import forward
    from .output import target_info
    model, trace, t, w, _ = prepare(args)
    lp = trace.log_probs[t]
    top = [target_info(model, lp, int(i)) for i in np.argsort(-lp, kind="stable")[:args.top]]
    body = {"top": top}
    shown = display.tokens(model, trace.ids)
    text = [f"tokens: {' '.join(shown)}", f"next token at position {t} ({shown[t]}):",
            f"{'rank':>4}  {'id':>6}  {'token':<20} {'p':>9}  {'log p':>10}"]
    text += [f"{x['rank']:>4}  {x['id']:>6}  {display.show(x['token'], x['piece']):<20} {x['prob']:>9.6f}  "
             f"{x['log_prob']:>10.6f}" for x in top]
    if args.target is not None or args.target_id is not None:
        tg = target_info(model, lp, w)
        text.append(f"target {display.show(tg['token'], tg['piece'])} (id {tg['id']}): p={tg['prob']:.6f} "
                    f"log p={tg['log_prob']:.6f} rank {tg['rank']}")
    if args.generate:
        if t != trace.T - 1:
            raise RefimplError("--generate continues after the last position; it cannot be combined with --position")
        out, stop = [int(i) for i in trace.ids], "length"
        for _ in range(args.generate):
            if len(out) >= model.cfg.n_ctx:
                stop = "context"
                break
            nxt = int(np.argmax(forward(model, out).log_probs[-1]))
            if nxt in model.cfg.prepend_ids or nxt == model.cfg.special_tokens.get("eos"):
                stop = "end_of_text"
                break
            out.append(nxt)
        new = out[trace.T:]
        body["generated"] = {"ids": new, "tokens": [model.token_str(i) for i in new], "text": model.decode(out),
                             "stop": stop}
        text.append(f"greedy continuation ({len(new)} tokens, stopped at {stop.replace('_', ' ')}):")
        text.append(model.decode(out))
    emit(args, body, "\n".join(text))


@command("models", "list the models shipped with the package")
def cmd_models(p, args=None):
    if args is None:
        p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
        return
    from .embedded import DATA, DEFAULT, embedded_models
    from .files import read_json
    rows = []
    for n in embedded_models():
        c = read_json(os.path.join(DATA, n, "config.json"))
        rows.append({"name": n, "default": n == DEFAULT, "path": os.path.join(DATA, n), "family": c["family"],
                     "n_layers": c["n_layers"], "d_model": c["d_model"], "d_vocab": c["d_vocab"]})
    text = [f"{r['name']}{' (default)' if r['default'] else ''}: {r['family']}, {r['n_layers']} layers, "
            f"d_model {r['d_model']}, vocabulary {r['d_vocab']}  [{r['path']}]" for r in rows]
    emit(args, {"models": rows}, "\n".join(text) if rows else "no embedded models installed")


@command("prepare", "optional one-time work per model: the counts' per-model constants and a compute-dtype weight copy")
def cmd_prepare(p, args=None):
    if args is None:
        model_options(p)
        p.add_argument("--weight-cache", choices=["auto", "yes", "no"], default="auto",
                       help="write the weights converted to --dtype (auto, the default: when the copy is at most 8 GB)")
        p.add_argument("--quiet", action="store_true", help="no progress on stderr")
        return
    from . import bounds, cache, progress
    model = open_model(args)
    with progress.reporting(progress.Progress("prepare", quiet=args.quiet)) as prog:
        nbytes = cache.weights_bytes(model)
        try:
            if args.weight_cache == "yes" or (args.weight_cache == "auto" and nbytes <= 8 * 1024**3):
                if model.upcast_cache is None and model.needs_upcast():
                    path = model.write_upcast_cache()
                    print(f"weights in {model.dtype.name}: {path} ({nbytes / 1e9:.2f} GB)")
            prog.stage("the counts' per-model constants (Gram matrix of the unembedding)")
            values = bounds.prepare_constants(model)
            folder = cache.save_constants(model, values, prog) if values else None
        except KeyboardInterrupt as e:
            e.hint = "the parts of the weight copy finished so far are kept; run the same command again to resume"
            raise
        prog.done()
    if folder:
        print(f"bracket constants of the counts stored in {folder}")
    else:
        print("no bracket constants stored: an adaptive softmax's are computed in each run")
