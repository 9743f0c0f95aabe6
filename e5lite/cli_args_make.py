"""The flags of the ``e5lite`` subcommands that make something from a model: ``train`` (a fine-tuned model
folder) and ``export-programs`` (its compiled programs), and ``--weights``, which ``export-programs`` shares with
the commands of ``cli_args``. ``cli_args.build_parser`` adds them."""

from __future__ import annotations

from .settings import ATTENTION_CHOICES, default_help


def add_weights_flag(p) -> None:
    """``--weights``, as every command that loads a model for inference takes it (``cli_args._common``) and
    ``export-programs`` writes programs for it."""
    p.add_argument(
        "--weights",
        default=None,
        choices=["bfloat16", "int8"],
        help="bfloat16: the layers' matmul weights in bfloat16 with float32 compute (faster one-query "
        "latency on CPU, cosine >= 0.999 against float32; README: Faster queries); int8: int8 weights and "
        "per-token int8 activations, int32 accumulation, the rest float32 (README: int8 weights)",
    )


def add_train(sub, handlers: dict) -> None:
    """``e5lite train``: contrastive fine-tuning; defaults come from ``TrainSettings``."""
    import dataclasses

    from .train import TrainSettings

    d = {f.name: f.default for f in dataclasses.fields(TrainSettings)}
    t = sub.add_parser("train", help="fine-tune on (query, positive[, negatives]) JSONL records with InfoNCE")
    t.add_argument("--model", required=True, help="local model folder or Hugging Face Hub id")
    t.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    t.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens")
    t.add_argument("--train", required=True, help="JSONL training records")
    t.add_argument("--output", required=True, help="the model folder to write (checkpoints and log in training/)")
    for field in ("query", "positive", "negative"):
        t.add_argument(f"--{field}-field", default=field, help=f"the records' {field} field (default: %(default)s)")
    for name, kind in (
        ("batch_size", int),
        ("learning_rate", float),
        ("weight_decay", float),
        ("warmup_steps", int),
        ("epochs", int),
        ("max_steps", int),
        ("temperature", float),
        ("seed", int),
        ("dropout", float),
        ("chunk_size", int),
    ):
        t.add_argument(f"--{name.replace('_', '-')}", type=kind, default=d[name], help="default: %(default)s")
    t.add_argument("--optimizer", default=d["optimizer"], choices=["adamw", "sgd"])
    t.add_argument("--dtype", default=d["dtype"], choices=["float32", "bfloat16"], help="compute dtype")
    t.add_argument("--no-shuffle", action="store_true", help="records in file order every epoch")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute each layer in the backward")
    t.add_argument("--eval", default=None, help="a BEIR folder evaluated during and after training")
    t.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: end only)")
    t.add_argument("--save-every", type=int, default=None, help="steps between resumable checkpoints")
    t.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    t.set_defaults(func=handlers["train"])


def add_export_programs(sub, handlers: dict) -> None:
    """``e5lite export-programs``: the engine's programs for a platform, serialized (``programs.py``)."""
    x = sub.add_parser(
        "export-programs",
        help="write the engine's programs for a platform as jax.export artifacts, for serve --programs DIR",
    )
    x.add_argument("--model", required=True, help="local model folder or Hugging Face Hub id")
    x.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    x.add_argument("--platform", required=True, choices=["cpu", "cuda", "tpu"], help="where the programs will run")
    x.add_argument("--output", required=True, metavar="DIR", help="the folder to write (manifest.json, programs/)")
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export in DIR")
    x.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_weights_flag(x)
    x.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens")
    x.add_argument(
        "--token-budget",
        type=int,
        default=None,
        help=f"tokens per batch (default: {default_help('token_budget')}, by --platform)",
    )
    x.add_argument(
        "--attention-impl",
        default="auto",
        choices=list(ATTENTION_CHOICES),
        help="default auto: as the engine resolves it (off this platform, the first candidate there)",
    )
    x.set_defaults(func=handlers["export-programs"])
