"""The ``e5lite`` command: embed, score, eval, train, attention, explain, info, serve, export-programs.

Its flags and their checks are in ``cli_args.py``; ``embed`` in ``cli_embed.py``, and its corpus runs
(``embed --output DIR``) in ``shards.runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
from pathlib import Path

from . import cli_args
from .cli_embed import cmd_embed, load_encoder
from .errors import E5LiteError, InputError
from .files import write_atomic


def side_prompts(args, enc) -> tuple[str, str]:
    """The query and passage prefixes of ``score`` and ``eval``: the flags', else the model's (``prompts.py``),
    told on stderr so that a run says what it embedded."""
    task = getattr(args, "task", None)
    qp = args.query_prompt if args.query_prompt is not None else enc.prompt_prefix(task=task) if task else None
    qp = enc.prompt_for("query") if qp is None else qp
    pp = enc.prompt_for("passage") if args.passage_prompt is None else args.passage_prompt
    print(f"prompts: queries {qp!r}, passages {pp!r} (model's: {enc.prompts_source})", file=sys.stderr)
    return qp, pp


def cmd_score(args) -> None:
    if args.task is not None and args.query_prompt is not None:
        raise InputError("--task and --query-prompt both set the queries' prefix: pass one")
    enc = load_encoder(args)
    qp, pp = side_prompts(args, enc)
    q = enc.encode(args.query, prompt=qp, batch_size=args.batch_size)
    p = enc.encode(args.passage, prompt=pp, batch_size=args.batch_size)
    scores = 100.0 * q @ p.T
    width = 8
    print(" " * 6 + "".join(f"{'P' + str(j):>{width}}" for j in range(len(args.passage))))
    for i, row in enumerate(scores):
        print(f"{'Q' + str(i):<6}" + "".join(f"{s:>{width}.2f}" for s in row))
    print()
    for i, t in enumerate(args.query):
        print(f"Q{i}: {qp}{t}")
    for j, t in enumerate(args.passage):
        print(f"P{j}: {pp}{t[:100]}{'...' if len(t) > 100 else ''}")


def _k_values(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise InputError(f"--k must be positive integers separated by commas, got {text!r}")
    return ks


def cmd_eval(args) -> None:
    from .beir import qrels_file
    from .evaluate import evaluate_retrieval, format_table

    k_values = _k_values(args.k)
    qrels_file(args.data, args.split)  # a missing folder or split fails before the model loads
    if args.output is not None and not Path(args.output).parent.is_dir():
        raise InputError(f"output folder {str(Path(args.output).parent)!r} does not exist")
    enc = load_encoder(args)
    query_prompt, passage_prompt = side_prompts(args, enc)
    report = evaluate_retrieval(
        enc,
        args.data,
        split=args.split,
        k_values=k_values,
        query_prompt=query_prompt,
        passage_prompt=passage_prompt,
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
        if args.output:
            print(f"wrote the similarity after each of {len(rows) - 1} layers to {args.output}", file=sys.stderr)
        # rows count the embeddings as 0; the table names layers as --layer does (0-based), "after" each
        print("| after | cosine (mean-pooled) | cosine ([CLS]) |\n|---|---|---|")
        for r in rows:
            after = "embeddings" if r["layer"] == 0 else f"layer {r['layer'] - 1}"
            print(f"| {after} | {r['cosine_mean']:.4f} | {r['cosine_cls']:.4f} |")
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


def cmd_explain(args) -> None:
    from .explain import cmd_explain as run

    run(args)


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
    rate = summary["tokens_per_s"]  # None with one step: its time is the compiling's (train._Throughput)
    speed = "" if rate is None else f", {rate:,.0f} tokens/s after the first step"
    print(
        f"trained {summary['steps']} steps (loss {summary['loss']:.4f}{speed}); wrote the model to {args.output}",
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
        "query_prompt": enc.prompt_for("query"),  # what encode_queries, score, eval and train put before queries
        "passage_prompt": enc.prompt_for("passage"),
        "prompts_source": enc.prompts_source,
        "devices": [str(d) for d in jax.devices()],
    }
    print(json.dumps(info, indent=2))


def _check_port_free(host: str, port: int) -> None:
    """A port another process listens on fails here, before the model loads and warms up (uvicorn would find
    out only then). Bound as uvicorn binds (SO_REUSEADDR), so a port in TIME_WAIT still passes."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise InputError(f"--host {host}: {e.strerror}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise InputError(
                f"cannot listen on {host}:{port}: {e.strerror} (another server there? choose one with --port)"
            ) from None


def cmd_serve(args) -> None:
    try:
        from .serve import Limits, serve
        from .serve.access import Access
    except ImportError as e:
        missing = (e.name or "").split(".")[0]
        if missing not in ("starlette", "uvicorn", "pydantic"):
            raise
        raise InputError(
            f"e5lite serve needs the serve extra ({missing} is missing): pip install 'e5lite[serve]'"
        ) from None
    try:
        limits = Limits.from_arguments(args)
        access = Access.from_arguments(args)  # the keys: never printed, in errors either
    except ValueError as e:  # names the flag
        raise InputError(str(e)) from None
    _check_port_free(args.host, args.port)
    print(f"e5lite serve: loading {args.model}, then compiling the query shapes (warm-up)", file=sys.stderr)
    enc = load_encoder(args)
    serve(
        enc,
        host=args.host,
        port=args.port,
        model_name=args.served_model_name or args.model,
        limits=limits,
        access=access,
        default_prompt_name=args.default_prompt_name,
        default_prompt=args.default_prompt,
        explorer=args.explorer,
    )


def cmd_export_programs(args) -> None:
    from tqdm.auto import tqdm

    from .program_export import export_programs

    bar = tqdm(desc="export-programs", unit="program", file=sys.stderr)

    def progress(i: int, n: int, name: str) -> None:  # called before each program
        bar.total = n
        bar.update(i - bar.n)
        bar.set_postfix_str(name)

    with bar:
        manifest = export_programs(
            args.model,
            args.platform,
            args.output,
            revision=args.revision,
            dtype=args.dtype,
            weights=args.weights,
            max_length=args.max_length,
            overwrite=args.overwrite,
            token_budget=args.token_budget,
            attention_impl=args.attention_impl,
            progress=progress,
        )
        bar.update(len(manifest["programs"]) - bar.n)
    print(
        f"wrote {len(manifest['programs'])} programs for {args.platform} (jax {manifest['jax']}) to "
        f"{args.output} in {manifest['export_s']:.0f} s",
        file=sys.stderr,
    )


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
            "explain": cmd_explain,
            "train": cmd_train,
            "export-programs": cmd_export_programs,
        }
    )


EXIT_BROKEN_PIPE = 141  # what a shell reports for a process SIGPIPE ended (128 + 13)


def _stdout_gone() -> bool:
    """Whether stdout's reader has left (the write end of a pipe polls as an error then), so that a broken pipe
    elsewhere (a socket, a worker) is still reported as an error. A stdout that cannot be polled: trust it."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poll.poll(0))
    except (OSError, ValueError, AttributeError):
        return True


def _silence_stdout() -> None:
    """Points stdout at /dev/null, so that the interpreter's last flush of what is buffered does not fail on
    the closed pipe again ("Exception ignored ... BrokenPipeError" at exit)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout with no file behind it (tests, notebooks)
        pass


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
    except BrokenPipeError as e:  # the reader left (`e5lite embed ... | head -1`): stop quietly, as CLIs do
        if not _stdout_gone():
            print(f"e5lite: error: {e}", file=sys.stderr)
            return 1
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (E5LiteError, OSError, ValueError, TypeError) as e:
        print(f"e5lite: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("e5lite: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
