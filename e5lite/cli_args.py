"""The ``e5lite`` command's flags: the parser of every subcommand (``cli_checks`` checks the combinations of
``embed``'s that argparse cannot express)."""

from __future__ import annotations

import argparse

from .cli_args_make import add_export_programs, add_train, add_weights_flag
from .settings import default_help
from .shards import ROWS_PER_SHARD


def _common(p) -> None:
    """The flags every subcommand takes: the model and the engine."""
    p.add_argument("--model", required=True, help="local model folder or Hugging Face Hub id")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_weights_flag(p)
    p.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens")
    p.add_argument("--batch-size", type=int, default=None, help="max texts per batch (default: fill the budget)")
    p.add_argument(
        "--token-budget", type=int, default=None, help=f"tokens per batch (default: {default_help('token_budget')})"
    )
    p.add_argument(
        "--streams", type=int, default=None, help=f"batches computed at once (default: {default_help('streams')})"
    )


PROMPT_NAME_HELP = "one of the model's prompts (e5lite info lists them), e.g. query: on E5 models 'query: '"
TASK_HELP = (
    '-instruct models: a one-sentence task description; queries get "Instruct: TASK\\nQuery: " '
    "(instead of --prompt-name)"
)


def _add_embed(sub, handlers: dict) -> None:
    """``e5lite embed``: texts in, embeddings out (one file, or resumable shards)."""
    e = sub.add_parser("embed", help="embed texts; writes .npy / .jsonl, or JSON arrays to stdout")
    _common(e)
    e.add_argument("texts", nargs="*", metavar="TEXT")
    e.add_argument("--input", default=None, help="a .txt file (one text per line), a .jsonl file, or - for stdin")
    e.add_argument("--field", default=None, help="the text field of .jsonl records (default: text)")
    e.add_argument(
        "--output",
        default=None,
        help="a .npy or .jsonl file, or a folder (trailing /, existing, or no suffix) for resumable "
        "sharded output (default: JSON arrays on stdout)",
    )
    e.add_argument("--prompt-name", default=None, help=PROMPT_NAME_HELP)
    e.add_argument("--task", default=None, help=TASK_HELP)
    e.add_argument("--no-normalize", action="store_true", help="skip L2 normalisation")
    e.add_argument(
        "--rows-per-shard",
        type=int,
        default=None,
        help=f"--output DIR, one process on one .txt/.jsonl file: rows per shard (default {ROWS_PER_SHARD})",
    )
    e.add_argument(
        "--shard-format",
        default=None,
        choices=["npy", "parquet"],
        help="--output DIR: .npy + .ids.json per shard (default), or Parquet (needs pyarrow; what --engine ray writes)",
    )
    e.add_argument(
        "--id-field",
        default=None,
        help="--output DIR: record field (Parquet: column) kept as the row id (default: the row number)",
    )
    e.add_argument("--overwrite", action="store_true", help="--output DIR: discard a previous run there")
    _add_vector_flags(e)
    _add_corpus_flags(e)
    e.set_defaults(func=handlers["embed"])


def _add_vector_flags(e) -> None:
    """``e5lite embed``'s long-input and compact-vector flags (every output)."""
    v = e.add_argument_group("long inputs and compact vectors (every output; README: Command line)")
    v.add_argument(
        "--long-inputs",
        default="truncate",
        choices=["truncate", "chunk"],
        help="texts past --max-length: truncate (default), or chunk: embed windows of the whole text and "
        "average them by token count",
    )
    v.add_argument(
        "--chunk-overlap",
        type=int,
        default=None,
        metavar="N",
        help="--long-inputs chunk: tokens consecutive windows share (default 0)",
    )
    v.add_argument(
        "--truncate-dim",
        type=int,
        default=None,
        metavar="N",
        help="keep the first N components (Matryoshka models), normalised after the cut",
    )
    v.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "int8", "uint8", "binary", "ubinary"],
        help="int8/uint8: 256 buckets per dimension; binary/ubinary: sign bits packed 8 per byte "
        "(sentence-transformers' quantize_embeddings)",
    )
    v.add_argument(
        "--calibration",
        type=int,
        default=None,
        metavar="N",
        help="int8/uint8: bucket ranges from the float vectors of the first N texts (default: all texts; "
        "--output DIR: the first 1000, fixed in the manifest before the run)",
    )
    v.add_argument(
        "--ranges",
        default=None,
        metavar="FILE.npy|DIR",
        help="int8/uint8: bucket ranges [2, dim] (min, max) from a .npy file or an earlier "
        "--output DIR run (to quantise queries like that corpus)",
    )


def _add_corpus_flags(e) -> None:
    """``e5lite embed``'s flags of corpus runs beyond one process (per host, Ray; --output DIR)."""
    c = e.add_argument_group("corpus runs beyond one process (--output DIR; README: Embedding a corpus on a cluster)")
    c.add_argument(
        "--shard-size",
        default=None,
        metavar="SIZE",
        help=".txt/.jsonl input per shard for per-host, Ray, folder, glob and Parquet runs, e.g. 512K, "
        "8M (default 8M; Parquet: one shard per row group)",
    )
    c.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="per host under jax.distributed: process 0's address; each process embeds its share of "
        "the shards on its own devices",
    )
    c.add_argument("--num-processes", type=int, default=None, help="with --coordinator: the number of processes")
    c.add_argument("--process-id", type=int, default=None, help="with --coordinator: this process, 0..N-1")
    c.add_argument(
        "--distributed",
        action="store_true",
        help="per host, with jax.distributed.initialize()'s own detection (TPU pods, SLURM, ...)",
    )
    c.add_argument("--engine", default="local", choices=["local", "ray"], help="ray: embed with Ray Data actors")
    c.add_argument("--num-actors", type=int, default=None, help="--engine ray: actors (default 1)")
    c.add_argument(
        "--ray-address", default=None, help="--engine ray: the cluster (default: a running Ray, else a local one)"
    )
    c.add_argument(
        "--gpus-per-actor",
        type=float,
        default=None,
        help="--engine ray: GPUs per actor (default: 1 when the cluster has GPUs, else 0)",
    )
    c.add_argument("--cpus-per-actor", type=float, default=None, help="--engine ray: CPUs per actor (default 1)")


def _add_score(sub, handlers: dict) -> None:
    """``e5lite score`` (the model card demo) and ``e5lite info``."""
    s = sub.add_parser("score", help="100 x cosine scores of queries against passages (the E5 model card demo)")
    _common(s)
    s.add_argument("--query", action="append", required=True)
    s.add_argument("--passage", action="append", required=True)
    s.add_argument("--task", default=None, help=TASK_HELP)
    _add_prompt_flags(s)
    s.set_defaults(func=handlers["score"])

    i = sub.add_parser("info", help="config, parameter count, pooling, max length, devices")
    _common(i)
    i.set_defaults(func=handlers["info"])


def _add_prompt_flags(p) -> None:
    """``score`` and ``eval``: the two sides' prefixes, when not the model's."""
    p.add_argument(
        "--query-prompt",
        default=None,
        help="prefix for queries, '' for none (default: the model's query prompt, see e5lite info)",
    )
    p.add_argument(
        "--passage-prompt",
        default=None,
        help="prefix for passages, '' for none (default: the model's document prompt, see e5lite info)",
    )


def _add_serve(sub, handlers: dict) -> None:
    """``e5lite serve``: the HTTP server and its limits."""
    v = sub.add_parser("serve", help="HTTP server: OpenAI /v1/embeddings, TEI /embed, /health, /info, /metrics")
    _common(v)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8080)
    v.add_argument(
        "--served-model-name", default=None, help="the model name in /info and in responses (default: --model)"
    )
    prompt = v.add_mutually_exclusive_group()
    prompt.add_argument(
        "--default-prompt-name",
        default=None,
        help="the model's prompt put before texts when a request names none, e.g. query "
        "(default: the model's default_prompt_name, if any)",
    )
    prompt.add_argument(
        "--default-prompt",
        default=None,
        help="text put before texts when a request names no prompt, e.g. 'query: ' (instead of a prompt name)",
    )
    v.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on the inference routes (every POST route); repeat it for "
        "several keys, e.g. while rotating them (default: the E5LITE_API_KEY environment variable, keys "
        "separated by commas, which keeps them out of ps; neither: no key needed)",
    )
    v.add_argument(
        "--cors-allow-origin",
        nargs="+",
        action="extend",
        default=None,
        metavar="ORIGIN",
        help="let web pages from these origins (https://host[:port], or '*' for any) call the server "
        "(default: no CORS headers, so pages from other origins cannot read the answers)",
    )
    v.add_argument(
        "--programs",
        default=None,
        metavar="DIR",
        help="run the programs e5lite export-programs wrote to DIR instead of tracing the model (README: "
        "Shipping compiled programs)",
    )
    v.add_argument(
        "--explorer",
        action="store_true",
        help="serve the explorer page at /explorer (attention, layer by layer, where the score comes from; "
        "its POST computes through this server, behind --api-key; the page itself is public)",
    )
    from .serve.limits import Limits  # the limits' flags, defaults and help; no server stack imported

    Limits.add_arguments(v)
    v.set_defaults(func=handlers["serve"])


def _add_eval(sub, handlers: dict) -> None:
    """``e5lite eval``: retrieval metrics on a BEIR folder."""
    r = sub.add_parser("eval", help="retrieval metrics (nDCG, MAP, recall, precision, MRR @k) on a BEIR-format folder")
    _common(r)
    r.add_argument("--data", required=True, help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    r.add_argument("--split", default="test", help="qrels split (default: %(default)s)")
    r.add_argument("--k", default="1,3,5,10,100", help="cut-offs, comma-separated (default: %(default)s)")
    r.add_argument("--output", default=None, help="write the report (metrics, counts, timings) as JSON here")
    r.add_argument(
        "--corpus-embeddings",
        default=None,
        help="an e5lite embed --output DIR run over corpus.jsonl (--id-field _id), used instead of "
        "embedding the corpus",
    )
    _add_prompt_flags(r)
    r.set_defaults(func=handlers["eval"])


def _add_attention(sub, handlers: dict) -> None:
    """``e5lite attention``: attention maps of one text, or layer-by-layer similarity of two."""
    a = sub.add_parser(
        "attention",
        help="attention heat maps of a text (PNG or JSON), or --compare: two texts' similarity layer by layer",
    )
    a.add_argument("--model", required=True, help="local model folder or Hugging Face Hub id")
    a.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    a.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens")
    a.add_argument("--text", required=True)
    a.add_argument("--prompt-name", default=None, help=PROMPT_NAME_HELP)
    a.add_argument(
        "--layer", type=int, default=-1, help="0-based layer; negative counts from the last (default: the last)"
    )
    a.add_argument("--head", type=int, default=None, help="one head (default: every head, one panel each)")
    a.add_argument(
        "--compare",
        default=None,
        metavar="TEXT2",
        help="instead of maps: cosine similarity of --text and TEXT2 after each layer",
    )
    a.add_argument(
        "--output",
        default=None,
        help="a .png (needs the viz extra) or .json file (default: JSON on stdout, or the --compare table)",
    )
    a.set_defaults(func=handlers["attention"])


def _add_explain(sub, handlers: dict) -> None:
    """``e5lite explain``: the explorer page and its data for one text or a query-passage pair."""
    x = sub.add_parser(
        "explain",
        help="why a query and a passage score what they do: attention, layer by layer, token-pair contributions "
        "(a self-contained --html page, --json data)",
    )
    x.add_argument("query", help="the query (prompted as encode_queries prompts it)")
    x.add_argument("passage", nargs="?", default=None, help="the passage (leave out for one text's attention)")
    x.add_argument("--model", required=True, help="local model folder or Hugging Face Hub id")
    x.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    x.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens")
    _add_prompt_flags(x)
    x.add_argument("--html", default=None, help="write the explorer page here (opens from file://, no network)")
    x.add_argument("--json", default=None, help="write the data here (exact attentions, contributions, cosines)")
    x.set_defaults(func=handlers["explain"])


def build_parser(handlers: dict) -> argparse.ArgumentParser:
    """The parser; each subcommand's ``func`` is ``handlers[name]`` (the ``cmd_*`` functions of ``cli.py``)."""
    parser = argparse.ArgumentParser(prog="e5lite", description="E5 / BERT text embeddings in pure JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_embed,
        _add_score,
        _add_serve,
        _add_eval,
        add_train,
        _add_attention,
        add_export_programs,
        _add_explain,
    ):
        add(sub, handlers)
    return parser
