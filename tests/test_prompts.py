"""prompts.py: one rule for a model's prompts. A folder's own (as sentence-transformers reads them, empty ones
included), else E5's for an E5 name, else none; and the CLI's score / info / train say which they used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import linked_copy

import e5lite
from e5lite.cli import main
from e5lite.prompts import E5_PROMPTS, ST_DEFAULT_PROMPTS, is_e5_family, is_instruct, read_prompts

TEXTS = ["summit define", "how much protein should a female eat", "Definition of summit: the highest point."]


def test_minilm_prompts_equal_sentence_transformers(minilm, minilm_dir):
    """all-MiniLM-L6-v2 declares no prompts and is not an E5 model: sentence-transformers gives it empty query
    and document prompts, and so does e5lite (not E5's "query: ")."""
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(minilm_dir), device="cpu")
    assert minilm.prompts == st.prompts == ST_DEFAULT_PROMPTS
    tol = dict(atol=1e-5, rtol=0)
    np.testing.assert_allclose(minilm.encode(TEXTS, prompt_name="query"), st.encode(TEXTS, prompt_name="query"), **tol)
    np.testing.assert_allclose(minilm.encode_queries(TEXTS), st.encode_query(TEXTS), **tol)
    np.testing.assert_allclose(minilm.encode_passages(TEXTS), st.encode_document(TEXTS), **tol)
    assert np.abs(minilm.encode_queries(TEXTS) - st.encode(TEXTS, prompt="query: ")).max() > 1e-3  # no E5 prefix


def test_e5_named_folder_without_prompts_gets_e5s(tiny_dir, tmp_path):
    """The same weights under an E5 name get "query: "/"passage: "; under another name, none; a folder's own
    prompts (even empty) win over the name."""
    e5 = e5lite.load(linked_copy(tiny_dir, tmp_path / "e5-tiny"))
    assert e5.prompts == E5_PROMPTS and "E5 defaults" in e5.prompts_source
    np.testing.assert_array_equal(e5.encode_queries(TEXTS), e5.encode(["query: " + t for t in TEXTS]))
    np.testing.assert_array_equal(e5.encode_passages(TEXTS), e5.encode(["passage: " + t for t in TEXTS]))
    plain = Path(shutil.copytree(tiny_dir, tmp_path / "bert-tiny"))
    other = e5lite.load(plain)
    assert other.prompts == ST_DEFAULT_PROMPTS and "not an E5 model" in other.prompts_source
    np.testing.assert_array_equal(other.encode_queries(TEXTS), other.encode(TEXTS))
    declared = tmp_path / "e5-declared"
    shutil.copytree(tiny_dir, declared)
    (declared / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "", "passage": ""}}))
    assert read_prompts(declared, str(declared)).prompts == {"query": "", "document": "", "passage": ""}


@pytest.mark.parametrize("name, folder, e5, instruct", [
    ("intfloat/e5-base-v2", "/cache/models--intfloat--e5-base-v2/snapshots/abc", True, False),
    ("/x/y", "/cache/models--intfloat--multilingual-e5-large-instruct/snapshots/abc", True, True),
    ("/models/E5_small", "/models/E5_small", True, False),
    ("/work/e5lite/models/bert", "/work/e5lite/models/bert", False, False),  # "e5lite" is not "e5"
    ("/tmp/e5-runs/minilm", "/tmp/e5-runs/minilm", False, False),  # a folder above it does not count
    ("sentence-transformers/all-MiniLM-L6-v2", "/m/all-MiniLM-L6-v2", False, False),
    ("/m/bge-small-instruct", "/m/bge-small-instruct", False, False),  # -instruct, but not E5
])
def test_e5_family_names(name, folder, e5, instruct):
    assert (is_e5_family(name, folder), is_instruct(name, folder)) == (e5, instruct)


def test_score_and_info_say_which_prompts(tiny_dir, tmp_path, capsys):
    """score (in-process) prints the prompts it used on stderr and takes --query-prompt/--passage-prompt; info
    shows the sides and where they come from; --task with --query-prompt fails before a model loads."""
    plain = str(linked_copy(tiny_dir, tmp_path / "bert-tiny"))  # not an E5 name: no prompts
    q, p = "summit define", "Definition of summit: the highest point of a mountain."
    assert main(["score", "--model", plain, "--query", q, "--passage", p]) == 0
    out, err = capsys.readouterr()
    assert "prompts: queries '', passages ''" in err and f"Q0: {q}" in out
    default = float(out.splitlines()[1].split()[1])
    assert main(["score", "--model", plain, "--query", q, "--passage", p, "--query-prompt", "query: ",
                 "--passage-prompt", "passage: "]) == 0
    out, err = capsys.readouterr()
    assert "prompts: queries 'query: ', passages 'passage: '" in err and f"Q0: query: {q}" in out
    assert float(out.splitlines()[1].split()[1]) != default
    assert main(["score", "--model", "/no/such/model", "--query", q, "--passage", p, "--task", "t",
                 "--query-prompt", "x"]) == 1
    assert "--task and --query-prompt" in capsys.readouterr().err  # before the (missing) model is read
    assert main(["info", "--model", str(tiny_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["query_prompt"], info["passage_prompt"], info["prompts"]) == ("query: ", "passage: ", E5_PROMPTS)
    assert "E5 defaults" in info["prompts_source"]
