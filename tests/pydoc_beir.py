"""A small BEIR-format retrieval set from real text: Python's own reference documentation (pydoc topics) as the
corpus, and questions a person would ask about Python, judged by hand (2: the answer, 1: related, 0: judged
not relevant). The "if" and "else" topics carry the same text, so their scores tie."""

from __future__ import annotations

import json
from pathlib import Path

from pydoc_data.topics import topics

# (query id, text, {topic: grade}, split)
QUERIES = [
    ("q1", "how do I catch an exception and still run cleanup code", {"try": 2, "exceptions": 1}, "test"),
    ("q2", "raise an error with a custom message", {"raise": 2, "exceptions": 1}, "test"),
    ("q3", "stop the program if a condition is false while debugging", {"assert": 2}, "test"),
    ("q4", "exit a loop early", {"break": 2, "for": 1, "while": 1, "continue": 0}, "test"),
    ("q5", "skip the rest of this loop iteration", {"continue": 2, "break": 0}, "test"),
    ("q6", "a statement that does nothing in an empty block", {"pass": 2}, "test"),
    ("q7", "define a small anonymous function inline", {"lambda": 2, "function": 1}, "test"),
    ("q8", "change a variable of the enclosing function from a nested function",
     {"nonlocal": 2, "global": 1, "naming": 1}, "test"),
    ("q9", "assign to a module level variable inside a function", {"global": 2, "naming": 1}, "test"),
    ("q10", "open a file and make sure it gets closed automatically", {"with": 2, "context-managers": 2}, "test"),
    ("q11", "write a generator that produces values lazily", {"yield": 2}, "test"),
    ("q12", "how to write a coroutine and wait for its result", {"async": 2, "await": 2}, "test"),
    ("q13", "format a number with two decimal places", {"formatstrings": 2, "string-methods": 1}, "test"),
    ("q14", "split a string on commas and strip the whitespace", {"string-methods": 2}, "test"),
    ("q15", "which values count as false in a condition",
     {"truth": 2, "booleans": 1, "if": 1, "else": 1}, "test"),
    ("q16", "precedence of the and, or and not operators", {"operator-summary": 2, "booleans": 1}, "test"),
    ("q17", "get the last three elements of a list", {"slicings": 2, "subscriptions": 1, "typesseq": 1}, "test"),
    ("q18", "append an item to the end of a list", {"typesseq-mutable": 2, "lists": 1}, "test"),
    ("q19", "look up a key in a dictionary with a default value", {"typesmapping": 2, "dict": 1}, "test"),
    ("q20", "delete a variable or remove an item from a list", {"del": 2, "typesseq-mutable": 1}, "test"),
    ("q21", "import a function from a module under another name", {"import": 2, "typesmodules": 1}, "test"),
    ("q22", "make my class support the + operator", {"numeric-types": 2, "specialnames": 1}, "test"),
    ("q23", "make an object work with len() and indexing", {"sequence-types": 2, "specialnames": 1}, "test"),
    ("q24", "control what happens when an attribute does not exist", {"attribute-access": 2}, "test"),
    ("q25", "integer division and the remainder of a division", {"binary": 2}, "test"),
    ("q26", "shift the bits of an integer to the left", {"shifting": 2, "bitwise": 1}, "test"),
    ("q27", "check whether an item is in a list", {"in": 2, "comparisons": 1}, "test"),
    ("q28", "step through my program line by line to find a bug", {"debugger": 2}, "test"),
    ("q29", "complex numbers with an imaginary part", {"imaginary": 2, "numbers": 1}, "test"),
    ("q30", "write integers in hexadecimal or binary", {"integers": 2}, "test"),
    ("q31", "what is the three dots object", {"bltin-ellipsis-object": 2}, "dev"),
    ("q32", "the value a function returns when it has no return statement",
     {"bltin-null-object": 1, "return": 2}, "dev"),
]
DOC_CHARS = 1500  # the opening of each topic: enough to say what it is about


def documents() -> list[dict]:
    docs = []
    for key, body in topics.items():
        title, *lines = body.strip().splitlines()
        text = " ".join(ln for ln in lines if set(ln.strip()) - set("*=-~^"))  # no reST heading underlines
        docs.append({"_id": key, "title": title.strip(), "text": " ".join(text[:DOC_CHARS].split())})
    return docs


def write_pydoc_beir(folder: Path) -> Path:
    """Writes corpus.jsonl, queries.jsonl and qrels/{test,dev}.tsv under ``folder``."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in documents()))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t, _, _ in QUERIES))
    for split in ("test", "dev"):
        rows = [f"{q}\t{doc}\t{grade}" for q, _, rel, s in QUERIES if s == split for doc, grade in rel.items()]
        (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    return folder


def training_records() -> list[dict]:
    """Real-text training pairs from the same documentation: a topic's heading as the query, its opening as
    the positive, and the next topic's opening as a hard negative (every third record has none)."""
    docs = documents()
    out = []
    for i, d in enumerate(docs):
        rec = {"query": d["title"], "positive": d["text"][:600]}
        if i % 3:
            rec["negative"] = docs[(i + 1) % len(docs)]["text"][:600]
        out.append(rec)
    return out
