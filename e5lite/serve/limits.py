"""The server's limits: one frozen dataclass, checked when it is made. Each field's metadata holds its
``e5lite serve`` flag and help, so the defaults are stated here only and the command line reads them.

Imports nothing of the server stack: the CLI builds its parser from this on every run.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace

from ..settings import BACKEND_DEFAULTS


def _limit(
    default, flag: str, help: str, *, kind: type = int, minimum: float | None = None, choices: tuple | None = None
):
    return field(
        default=default, metadata={"flag": flag, "help": help, "kind": kind, "minimum": minimum, "choices": choices}
    )


@dataclass(frozen=True)
class Limits:
    """What the server accepts and how long it lets work wait (see README, "HTTP server")."""

    max_inputs: int = _limit(
        2048, "--max-client-batch-size", "inputs per request; more are refused (413 on /embed, 400 on /v1)", minimum=1
    )
    payload_limit: int = _limit(
        2_000_000,
        "--payload-limit",
        "request bodies larger than this many bytes get 413, before they are read (as TEI's default)",
        minimum=1,
    )
    max_queue: int = _limit(1024, "--max-queue", "requests waiting for the batch worker; more get 429", minimum=1)
    max_queue_tokens: int | None = _limit(
        None,
        "--max-queue-tokens",
        "tokens waiting for the batch worker; a request that would pass this gets 429, and one larger "
        "than this alone 413, as no wait would make room for it (default: 8 x --max-batch-tokens)",
        minimum=1,
    )
    max_batch_tokens: int | None = _limit(
        None,
        "--max-batch-tokens",
        "tokens per engine call, from one request or several (default: 4 x the token "
        f"budget: {4 * BACKEND_DEFAULTS['cpu']['token_budget']} on CPU)",
        minimum=1,
    )
    max_wait_ms: float = _limit(
        2.0,
        "--max-wait-ms",
        "how long the worker waits for batch-mates that are still "
        "being tokenised (a request at an idle server starts at once)",
        kind=float,
        minimum=0,
    )
    max_queue_wait_ms: float = _limit(
        2000.0,
        "--max-queue-wait-ms",
        "the longest a request may wait before the model starts on it: one the "
        "measured throughput says would wait longer gets 429 at once, and one still "
        "waiting by then gets 429 without reaching the model",
        kind=float,
        minimum=1,
    )
    shutdown_timeout: float = _limit(
        20.0,
        "--shutdown-timeout",
        "seconds SIGTERM waits for admitted requests to finish (new ones get 503); "
        "those left then get 503 and the server exits",
        kind=float,
        minimum=0,
    )
    compute_nice: int = _limit(
        10,
        "--compute-nice",
        "nice value of every thread but the event loop's (the model's, XLA's, tokenising): the loop answers "
        "and refuses first while the model keeps the cores it leaves idle; 0 keeps them all at the server's",
        minimum=0,
    )
    long_inputs: str = _limit(
        "truncate",
        "--long-inputs",
        "texts past the max length: truncate them (or refuse, "
        "see --no-auto-truncate), or chunk them into windows whose embeddings are averaged "
        "(README: Long inputs)",
        kind=str,
        choices=("truncate", "chunk"),
    )
    chunk_overlap: int = _limit(
        0, "--chunk-overlap", "with --long-inputs chunk: tokens consecutive windows share", minimum=0
    )
    auto_truncate: bool = _limit(
        True,
        "--no-auto-truncate",
        "refuse texts past the max length (TEI requests may still ask for truncate=true)",
        kind=bool,
    )

    def __post_init__(self):
        for f in fields(self):
            value, kind, minimum = getattr(self, f.name), f.metadata["kind"], f.metadata["minimum"]
            if value is None and f.default is None:
                continue
            numeric = (int, float) if kind is float else (kind,)
            if (isinstance(value, bool) and kind is not bool) or not isinstance(value, numeric):
                raise ValueError(f"{f.name} ({f.metadata['flag']}) must be {kind.__name__}, got {value!r}")
            if minimum is not None and value < minimum:
                raise ValueError(f"{f.name} ({f.metadata['flag']}) must be at least {minimum:g}, got {value!r}")
            if f.metadata["choices"] and value not in f.metadata["choices"]:
                raise ValueError(
                    f"{f.name} ({f.metadata['flag']}) must be one of {', '.join(f.metadata['choices'])}, got {value!r}"
                )

    @property
    def chunk(self) -> bool:
        """Long texts are cut into windows rather than truncated."""
        return self.long_inputs == "chunk"

    def resolved(self, token_budget: int) -> Limits:
        """These limits with the defaults that depend on the engine filled in."""
        batch = self.max_batch_tokens or 4 * token_budget
        # the token bound matters while the throughput is not yet measured, and backs up the wait estimate
        return replace(self, max_batch_tokens=batch, max_queue_tokens=self.max_queue_tokens or 8 * batch)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per limit, with its default and help."""
        for f in fields(cls):
            flag, help, kind = f.metadata["flag"], f.metadata["help"], f.metadata["kind"]
            if kind is bool:  # on by default: the flag turns it off
                parser.add_argument(flag, dest=f.name, action="store_false", help=help)
                continue
            if f.default is not None:
                help += " (default: %(default)s)"
            parser.add_argument(
                flag,
                dest=f.name,
                type=kind,
                default=f.default,
                help=help,
                choices=f.metadata["choices"],
                metavar=None if f.metadata["choices"] else flag[2:].upper().replace("-", "_"),
            )

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> Limits:
        """The limits ``add_arguments``' flags gave; ValueError names the flag of a bad value."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
