"""explain.py, ``e5lite explain`` and ``e5lite serve --explorer``: the explorer's data checked against
transformers' BertModel (eager attention) run here on the real all-MiniLM-L6-v2, its page, the CLI and the route.
The page in a browser is test_explorer_browser.py's."""

from __future__ import annotations

import base64
import json
import re
import types

import numpy as np
import pytest
from conftest import linked_copy

import e5lite
from e5lite.cli import main
from e5lite.errors import InputError
from e5lite.explain import explain, page_data, render_html

# non-ASCII on both sides: accents (which MiniLM's tokenizer strips), CJK, an emoji ([UNK]), a dash
QUERY = "Wie viel Eiweiß braucht eine Frau? 東京 🚀"
PASSAGE = "As a general guideline — the CDC's average requirement of protein for women (19–70) is 46 g per day; café."
ATOL = 1e-5  # float32 forward against transformers' float32 eager forward


@pytest.fixture(scope="module")
def e5_minilm(minilm_dir, tmp_path_factory):
    """MiniLM's weights under an E5 name, so that it gets E5's prompts ("query: ", "passage: "; prompts.py)."""
    return e5lite.load(linked_copy(minilm_dir, tmp_path_factory.mktemp("named") / "e5-minilm"))


@pytest.fixture(scope="module")
def pair(e5_minilm):
    return explain(e5_minilm, QUERY, PASSAGE)


@pytest.fixture(scope="module")
def hf(minilm_dir):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    return tok, transformers.AutoModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()


def reference(hf, text: str):
    """transformers' tokens, every layer's hidden states [L + 1, S, D] and attentions [L, N, S, S]."""
    import torch

    tok, hf = hf
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = hf(input_ids=ids, output_hidden_states=True, output_attentions=True)
    hidden = torch.stack(out.hidden_states)[:, 0].numpy()
    return tok.convert_ids_to_tokens(ids[0]), hidden, torch.stack(out.attentions)[:, 0].numpy()


def test_pair_matches_transformers(pair, e5_minilm, hf):
    q_tokens, hq, aq = reference(hf, "query: " + QUERY)
    p_tokens, hp, ap = reference(hf, "passage: " + PASSAGE)
    assert pair["query_tokens"] == q_tokens and pair["passage_tokens"] == p_tokens
    # the prompts are tokens like the others, and the data says which
    assert pair["query_prompt"] == "query: " and q_tokens[1:3] == ["query", ":"] and pair["query_prompt_span"] == [1, 3]
    assert pair["passage_prompt"] == "passage: " and pair["passage_prompt_span"] == [1, 3]
    assert "東" in q_tokens and "[UNK]" in q_tokens and "—" in p_tokens  # the non-ASCII text reached the model
    for side, want in (("query", aq), ("passage", ap)):
        got = np.array(pair["attentions"][side])
        assert got.shape == want.shape == (6, 12, len(want[0, 0]), len(want[0, 0]))
        np.testing.assert_allclose(got, want, atol=ATOL)
    # the score: transformers' mean-pooled cosine, and encode_queries / encode_passages' (the engine's path)
    q_D, p_D = hq[-1].mean(0), hp[-1].mean(0)
    want_cos = float(q_D @ p_D / np.linalg.norm(q_D) / np.linalg.norm(p_D))
    assert pair["cosine"] == pytest.approx(want_cos, abs=ATOL)
    engine_cos = float(e5_minilm.encode_queries([QUERY])[0] @ e5_minilm.encode_passages([PASSAGE])[0])
    assert pair["cosine"] == pytest.approx(engine_cos, abs=ATOL)
    # the split: the sum is the cosine, and each entry is the formula on transformers' states
    c = np.array(pair["contributions"])
    assert c.shape == (len(q_tokens), len(p_tokens))
    assert abs(float(c.sum()) - pair["cosine"]) <= ATOL
    n, m = c.shape
    want_c = (hq[-1] @ hp[-1].T) / (n * m * np.linalg.norm(q_D) * np.linalg.norm(p_D))
    np.testing.assert_allclose(c, want_c, atol=ATOL / (n * m) * 10)  # entries are ~1/(n m) each
    # layer by layer, from transformers' hidden states (mean-pooled and [CLS])
    for row, q, p in zip(pair["layers"], hq, hp, strict=True):
        cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
        assert row["cosine_mean"] == pytest.approx(cos(q.mean(0), p.mean(0)), abs=ATOL)
        assert row["cosine_cls"] == pytest.approx(cos(q[0], p[0]), abs=ATOL)
    assert pair["layers"][-1]["cosine_mean"] == pytest.approx(pair["cosine"], abs=1e-12)


def test_top_pairs_are_the_largest_entries(pair):
    c = np.array(pair["contributions"])
    top = pair["top_pairs"]
    assert len(top) == 10
    assert [t["contribution"] for t in top] == sorted(np.sort(c, axis=None)[::-1][:10].tolist())[::-1]
    for t in top:
        assert c[t["query_index"], t["passage_index"]] == t["contribution"]
        assert t["query_token"] == pair["query_tokens"][t["query_index"]]
        assert t["passage_token"] == pair["passage_tokens"][t["passage_index"]]


def test_prompts_follow_encode_queries_and_can_be_set(minilm):
    data = explain(minilm, "a question", "an answer")  # MiniLM declares none: no prompt tokens
    assert data["query_prompt"] == "" and data["query_prompt_span"] == [1, 1]
    data = explain(minilm, "a question", "an answer", query_prompt="search: ", passage_prompt="")
    assert data["query_tokens"][:4] == ["[CLS]", "search", ":", "a"] and data["query_prompt_span"] == [1, 3]
    cos = float(minilm.encode(["search: a question"])[0] @ minilm.encode(["an answer"])[0])
    assert data["cosine"] == pytest.approx(cos, abs=ATOL)


def test_one_text_has_attention_only(minilm):
    data = explain(minilm, "just one text")
    assert set(data["attentions"]) == {"query"} and "cosine" not in data and "passage_tokens" not in data
    probs = np.array(data["attentions"]["query"])
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_bad_input_is_named():
    with pytest.raises(InputError, match="query must be a str, got int"):
        explain(types.SimpleNamespace(pooling="mean"), 3, "x")
    with pytest.raises(InputError, match="passage must be a str, got list"):
        explain(types.SimpleNamespace(pooling="mean"), "x", ["y"])
    with pytest.raises(InputError, match="this model pools with 'cls'"):
        explain(types.SimpleNamespace(pooling="cls"), "x", "y")


def embedded(html: str) -> dict:
    """The page's JSON blob."""
    found = re.search(r'<script type="application/json" id="e5lite-data">(.*?)</script>', html, re.S)
    assert found, "no data blob in the page"
    return json.loads(found.group(1))


def test_page_is_self_contained_and_holds_the_data(minilm_dir):
    text = " ".join(["The committee reviewed the budget and the schedule for the northern bridges."] * 8)
    long_q, long_p = "東京 </script><!-- " + text, "café & <b>bold</b> " + text
    small = e5lite.load(minilm_dir, max_length=64)
    data = explain(small, long_q, long_p)
    assert len(data["query_tokens"]) == len(data["passage_tokens"]) == 64  # cut as encode cuts
    html = render_html(data)
    assert len(html.encode()) < 1_000_000, len(html.encode())  # a 64-token pair on MiniLM
    # no address the browser could fetch: no src, no link but the empty data: icon, no url(), no http(s)
    assert not re.search(r"\bsrc\s*=|url\(|https?://(?!www\.w3\.org/2000/svg)", html)
    assert re.findall(r"<link[^>]*>", html) == ['<link rel="icon" href="data:,">']
    blob = embedded(html)
    assert blob["live"] is None and blob["explanation"] == json.loads(json.dumps(page_data(data)))
    shown = blob["explanation"]
    assert shown["query_text"] == long_q and shown["contributions"] == data["contributions"]
    for side in ("query", "passage"):
        b = np.frombuffer(base64.b64decode(shown["attentions_uint8"][side]), np.uint8)
        want = np.array(data["attentions"][side])
        assert np.abs(b.reshape(want.shape) / 255 - want).max() <= 0.5 / 255 + 1e-6


def test_cli_writes_json_and_html(minilm_dir, tmp_path, capsys):
    out_json, out_html = tmp_path / "x.json", tmp_path / "x.html"
    args = ["explain", "--model", str(minilm_dir), QUERY, PASSAGE, "--json", str(out_json), "--html", str(out_html)]
    assert main(args) == 0
    stdout, stderr = capsys.readouterr()
    report = json.loads(out_json.read_text())
    assert set(report) >= {"query_tokens", "passage_tokens", "cosine", "contributions", "attentions", "layers"}
    assert report == json.loads(json.dumps(explain(e5lite.load(minilm_dir), QUERY, PASSAGE)))
    assert embedded(out_html.read_text())["explanation"]["cosine"] == report["cosine"]
    assert f"cosine {report['cosine']:.4f}" in stdout and "| layer 5 |" in stdout
    assert f"wrote the page to {out_html}" in stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--html", "x.txt"], "--html x.txt: use a .html suffix"),
        (["--json", "/no/such/folder/x.json"], "folder '/no/such/folder' does not exist"),
    ],
)
def test_cli_bad_arguments(minilm_dir, capsys, extra, message):
    assert main(["explain", "--model", str(minilm_dir), "a", "b", *extra]) == 1
    assert message in capsys.readouterr().err


def test_served_explorer(minilm):
    pytest.importorskip("httpx")
    from starlette.testclient import TestClient

    from e5lite.serve import build_app
    from e5lite.serve.access import Access
    from e5lite.serve.explorer import MAX_TOKENS

    with TestClient(build_app(minilm, model_name="m")) as c:  # off by default
        assert c.get("/explorer").status_code == 404
    with TestClient(build_app(minilm, model_name="m", access=Access(("k1",)), explorer=True)) as c:
        page = c.get("/explorer")  # public: the page holds no data
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert embedded(page.text) == {"explanation": None, "live": {"model": "m", "keyed": True, "max_tokens": 128}}
        body = {"query": QUERY, "passage": PASSAGE}
        assert c.post("/explorer", json=body).status_code == 401  # computing wants the key
        r = c.post("/explorer", json=body, headers={"Authorization": "Bearer k1"})
        assert r.status_code == 200, r.text
        assert r.json() == json.loads(json.dumps(page_data(explain(minilm, QUERY, PASSAGE))))
        one = c.post("/explorer", json={"query": "one"}, headers={"Authorization": "Bearer k1"}).json()
        assert "cosine" not in one and set(one["attentions_uint8"]) == {"query"}
        for bad, status, words in (
            ({"query": 3}, 422, "'query' must be a string"),
            ({"query": "a", "passages": "b"}, 422, "unknown field 'passages'"),
            ([1], 422, "must be a JSON object"),
            ({"query": "word " * MAX_TOKENS}, 413, f"the explorer takes up to {MAX_TOKENS}"),
        ):
            r = c.post("/explorer", json=bad, headers={"Authorization": "Bearer k1"})
            assert r.status_code == status and words in r.json()["error"], r.text
