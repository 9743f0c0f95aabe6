"""The ``e5lite`` command: embed, score, eval, train, attention, info, serve.

Its flags and their checks are in ``cli_args.py``; ``embed`` in ``cli_embed.py``, and its corpus runs
(``embed --output DIR``) in ``shards.runs``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import cli_args
from .cli_embed import cmd_embed, load_encoder
from .errors import E5LiteError, InputError
from .files import write_atomic


def cmd_score(args) -> None:
    enc = load_encoder(args)
    q = enc.encode_queries(args.query, task=args.task, batch_size=args.batch_size)
    p = enc.encode(args.passage, prompt_name="passage", batch_size=args.batch_size)
    scores = 100.0 * q @ p.T
    width = 8
    print(" " * 6 + "".join(f"{'P' + str(j):>{width}}" for j in range(len(args.passage))))
    for i, row in enumerate(scores):
        print(f"{'Q' + str(i):<6}" + "".join(f"{s:>{width}.2f}" for s in row))
    print()
    for i, t in enumerate(args.query):
        print(f"Q{i}: {enc.prompt_prefix(task=args.task) if args.task else enc.prompts['query']}{t}")
    for j, t in enumerate(args.passage):
        print(f"P{j}: {enc.prompts['passage']}{t[:100]}{'...' if len(t) > 100 else ''}")


def _k_values(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise InputError(f"--k must be positive integers separated by commas, got {text!r}")
    return ks


def cmd_eval(args) -> None:
    from .evaluate import evaluate_retrieval, format_table

    k_values = _k_values(args.k)
    if args.output is not None and not Path(args.output).parent.is_dir():
        raise InputError(f"output folder {str(Path(args.output).parent)!r} does not exist")
    enc = load_encoder(args)
    report = evaluate_retrieval(
        enc,
        args.data,
        split=args.split,
        k_values=k_values,
        query_prompt=args.query_prompt,
        passage_prompt=args.passage_prompt,
        batch_size=args.batch_size,
        corpus_embeddings=args.corpus_embeddings,
        show_progress_bar=True,
    )
    print(
        f"{report['data']} ({report['split']}): {report['queries']} queries, {report['corpus']} documents; "
        f"embedding {report['embed_s']:.1f} s, search {report['search_s']:.2f} s"
    )
    print(format_table(report))
    if args.output:
        write_atomic(Path(args.output), (json.dumps(report, indent=1) + "\n").encode())
        print(f"wrote {args.output}", file=sys.stderr)


def cmd_attention(args) -> None:
    from . import viz
    from .encoder import load

    suffix = Path(args.output).suffix if args.output else None
    if suffix not in (None, ".png", ".json"):
        raise InputError(f"output {args.output!r}: use a .png or .json suffix")
    if suffix == ".png":
        viz._pyplot()  # a missing extra fails before the model loads
    enc = load(args.model, revision=args.revision, max_length=args.max_length)
    if args.compare is not None:
        rows = viz.layer_similarity(enc, args.text, args.compare, prompt_name=args.prompt_name)
        if suffix == ".png":
            viz.plot_similarity(args.output, rows, args.text, args.compare)
        elif suffix == ".json":
            write_atomic(Path(args.output), json.dumps(rows, indent=1).encode())
        print("| layer | cosine (mean-pooled) | cosine ([CLS]) |\n|---|---|---|")
        for r in rows:
            print(f"| {r['layer']} | {r['cosine_mean']:.4f} | {r['cosine_cls']:.4f} |")
        return
    L, N = enc.config.num_hidden_layers, enc.config.num_attention_heads
    if not -L <= args.layer < L:
        raise InputError(f"--layer {args.layer}: this model has layers 0..{L - 1}")
    if args.head is not None and not 0 <= args.head < N:
        raise InputError(f"--head {args.head}: this model has heads 0..{N - 1}")
    layer = args.layer % L
    heads = list(range(N)) if args.head is None else [args.head]
    tokens, probs = viz.attention_maps(enc, args.text, prompt_name=args.prompt_name)
    if suffix == ".png":
        viz.plot_attention(args.output, tokens, probs[layer], layer, heads)
        print(
            f"wrote layer {layer}'s attention ({len(heads)} heads, {len(tokens)} tokens) to {args.output}",
            file=sys.stderr,
        )
        return
    report = json.dumps(
        {
            "tokens": tokens,
            "layer": layer,
            "heads": heads,
            "attentions": [probs[layer, h].round(6).tolist() for h in heads],
        }
    )
    if suffix == ".json":
        write_atomic(Path(args.output), report.encode())
    else:
        print(report)


def cmd_train(args) -> None:
    try:
        import optax  # noqa: F401
    except ImportError:
        raise InputError("e5lite train needs the train extra (optax is missing): pip install 'e5lite[train]'") from None
    from .encoder import load
    from .train import TrainSettings, fit

    settings = TrainSettings(
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        epochs=args.epochs,
        max_steps=args.max_steps,
        temperature=args.temperature,
        seed=args.seed,
        shuffle=not args.no_shuffle,
        dropout=args.dropout,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        chunk_size=args.chunk_size,
    )
    enc = load(args.model, revision=args.revision, max_length=args.max_length)
    summary = fit(
        enc,
        args.train,
        args.output,
        settings=settings,
        eval_data=args.eval,
        eval_every=args.eval_every,
        save_every=args.save_every,
        resume=args.resume,
        query_field=args.query_field,
        positive_field=args.positive_field,
        negative_field=args.negative_field,
    )
    print(
        f"trained {summary['steps']} steps (loss {summary['loss']:.4f}, {summary['tokens_per_s']:,.0f} tokens/s); "
        f"wrote the model to {args.output}",
        file=sys.stderr,
    )
    if summary["eval"]:
        from .evaluate import format_table

        print(format_table(summary["eval"]))


def cmd_info(args) -> None:
    import jax

    from .weights import num_params

    enc = load_encoder(args)
    info = {
        "model_dir": str(enc.model_dir),
        "architecture": enc.config.model_type,
        "tokenizer": enc.tokenizer.kind,
        "config": enc.config.to_dict(),
        "parameters": num_params(enc.params),
        "dim": enc.dim,
        "pooling": enc.pooling,
        "max_length": enc.max_length,
        "dtype": enc.dtype.name,
        "prompts": enc.prompts,
        "default_prompt_name": enc.default_prompt_name,
        "devices": [str(d) for d in jax.devices()],
    }
    print(json.dumps(info, indent=2))


def cmd_serve(args) -> None:
    try:
        from .serve import Limits, serve
    except ImportError as e:
        missing = (e.name or "").split(".")[0]
        if missing not in ("starlette", "uvicorn", "pydantic"):
            raise
        raise InputError(
            f"e5lite serve needs the serve extra ({missing} is missing): pip install 'e5lite[serve]'"
        ) from None
    try:
        limits = Limits.from_arguments(args)
    except ValueError as e:  # names the flag
        raise InputError(str(e)) from None
    enc = load_encoder(args)
    serve(enc, host=args.host, port=args.port, model_name=args.served_model_name or args.model, limits=limits)


def build_parser() -> argparse.ArgumentParser:
    """The command's parser (``cli_args``), each subcommand calling its ``cmd_*`` function here."""
    return cli_args.build_parser(
        {
            "embed": cmd_embed,
            "score": cmd_score,
            "info": cmd_info,
            "serve": cmd_serve,
            "eval": cmd_eval,
            "attention": cmd_attention,
            "train": cmd_train,
        }
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command == "train":  # a command line of its own, not a call from Python
        from .runtime import restart_with_huge_pages

        restart_with_huge_pages()
    if getattr(args, "command", None) == "embed":
        args.field_given = args.field is not None
        args.field = args.field or "text"
    try:
        args.func(args)
    except (E5LiteError, OSError, ValueError, TypeError) as e:
        print(f"e5lite: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("e5lite: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
