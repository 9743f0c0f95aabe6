"""A reproducible corpus of real English text of mixed lengths, for benchmarks (no download needed).

Paragraphs come from the docstrings of Python standard-library modules, classes and functions (prose only:
doctest and indented code lines are dropped). A few "documents" join consecutive paragraphs so that some
texts run past 512 tokens, as real passages do. The same Python version gives the same corpus.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re

MODULES = ("argparse", "asyncio", "collections", "concurrent.futures", "csv", "datetime", "decimal", "email",
           "functools", "http.client", "http.server", "inspect", "itertools", "json", "logging", "pathlib",
           "pickle", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
           "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile",
           "xml.etree.ElementTree", "heapq", "bisect", "fractions", "random", "calendar", "difflib", "gzip")


def _docstrings():
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        yield inspect.getdoc(mod) or ""
        for _, obj in sorted(vars(mod).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == mod.__name__:
                yield inspect.getdoc(obj) or ""
                if inspect.isclass(obj):
                    for _, meth in sorted(vars(obj).items()):
                        if inspect.isfunction(meth):
                            yield inspect.getdoc(meth) or ""


def paragraphs(min_words: int = 8) -> list[str]:
    seen, out = set(), []
    for doc in _docstrings():
        for para in re.split(r"\n\s*\n", doc):
            lines = [ln for ln in para.splitlines() if not ln.startswith((" ", "\t", ">>>", "..."))]
            text = " ".join(ln.strip() for ln in lines).strip()
            if len(text.split()) >= min_words and text not in seen and sum(c.isalpha() for c in text) > len(text) / 2:
                seen.add(text)
                out.append(text)
    return out


def build_corpus(n: int = 2000, long_fraction: float = 0.03, seed: int = 0) -> list[str]:
    """n texts: mostly single paragraphs (shuffled), plus ``long_fraction`` multi-paragraph documents."""
    paras = paragraphs()
    rng = random.Random(seed)
    n_long = int(n * long_fraction)
    texts = []
    for _ in range(n_long):
        start = rng.randrange(len(paras) - 40)
        texts.append(" ".join(paras[start:start + 40]))
    short = paras[:]
    rng.shuffle(short)
    while len(texts) < n:
        texts.extend(short[: n - len(texts)])
    rng.shuffle(texts)
    return texts


if __name__ == "__main__":
    import json
    import sys
    texts = build_corpus(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
    json.dump(texts, sys.stdout)
