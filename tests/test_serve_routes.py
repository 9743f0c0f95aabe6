"""TEI's whole route table on the real all-MiniLM-L6-v2, in process (Starlette's TestClient): each route against
what sentence-transformers, transformers and tokenizers answer for the same inputs, run here. The real clients
(huggingface_hub, llama-index, openai) against a served process are in test_serve_clients.py."""

from __future__ import annotations

import numpy as np
import pytest

import e5lite

pytest.importorskip("starlette")
pytest.importorskip("httpx")  # TestClient drives the app through httpx
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")

EMB_ATOL = 1e-5  # float32 forward of two implementations: embeddings
HIDDEN_ATOL = 1e-4  # per-token hidden states before pooling (larger values, no averaging)


def real_texts() -> list[str]:
    """Python's own docs: short questions and paragraphs, non-ASCII, and a topic several times past 256 tokens."""
    from pydoc_data.topics import topics
    long = topics["exceptions"] + topics["types"]
    return ["How do I open a file for reading?", "What does the with statement do?",
            topics["pass"].split("\n\n")[1].strip(), "Größe and naïve café — Unicode text ✓",
            long]


TEXTS = real_texts()


@pytest.fixture(scope="module")
def enc(minilm_dir):
    return e5lite.load(minilm_dir)


@pytest.fixture(scope="module")
def ref(minilm_dir):
    return st.SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="module")
def hf_tok(minilm_dir):
    return transformers.AutoTokenizer.from_pretrained(minilm_dir)


def app(enc, **limits):
    from starlette.testclient import TestClient

    from e5lite.serve import Limits, build_app
    return TestClient(build_app(enc, model_name="minilm", limits=Limits(**limits)))


@pytest.fixture(scope="module")
def client(enc):
    with app(enc) as c:
        yield c


def vectors(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.array(r.json(), np.float32)


@pytest.mark.parametrize("path", ["/", "/invocations", "/embed"])
def test_post_root_and_invocations_are_embed(client, ref, path):
    expected = ref.encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(vectors(client.post(path, json={"inputs": TEXTS})), expected, atol=EMB_ATOL, rtol=0)
    np.testing.assert_allclose(vectors(client.post(path, json={"inputs": TEXTS[0]})), expected[:1], atol=EMB_ATOL,
                               rtol=0)


@pytest.mark.parametrize("path", ["/", "/ping", "/health"])
def test_get_health_aliases(client, path):
    r = client.get(path)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_openai_embeddings_alias(client, ref):
    r = client.post("/embeddings", json={"input": TEXTS[:3]})  # model is optional, as in TEI
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], np.float32)
    np.testing.assert_allclose(got, ref.encode(TEXTS[:3]), atol=EMB_ATOL, rtol=0)
    assert r.json()["model"] == "minilm"


def test_embed_all_equals_last_hidden_state(client, minilm_dir, hf_tok):
    model = transformers.AutoModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    r = client.post("/embed_all", json={"inputs": TEXTS, "truncate": True})
    assert r.status_code == 200, r.text
    got = r.json()
    assert len(got) == len(TEXTS)
    for text, states in zip(TEXTS, got):
        enc_ = hf_tok(text, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            want = model(**enc_).last_hidden_state[0].numpy()
        assert np.array(states).shape == want.shape
        np.testing.assert_allclose(np.array(states, np.float32), want, atol=HIDDEN_ATOL, rtol=0)


def test_similarity_equals_sentence_transformers_cosine(client, ref):
    source, sentences = TEXTS[0], TEXTS[1:]
    r = client.post("/similarity", json={"inputs": {"source_sentence": source, "sentences": sentences},
                                         "parameters": {"truncate": True}})
    assert r.status_code == 200, r.text
    want = st.util.cos_sim(ref.encode([source]), ref.encode(sentences))[0].numpy()
    np.testing.assert_allclose(np.array(r.json(), np.float32), want, atol=EMB_ATOL, rtol=0)
    r = client.post("/similarity", json={"inputs": {"source_sentence": source}})
    assert r.status_code == 422 and r.json()["error"] == "missing field 'inputs.sentences'"


def test_tokenize_equals_the_tokenizer_with_byte_offsets(client, hf_tok):
    texts = TEXTS[:4] + [TEXTS[4][:3000]]  # not truncated: /tokenize gives every token, as TEI does
    r = client.post("/tokenize", json={"inputs": texts})
    assert r.status_code == 200, r.text
    for text, tokens in zip(texts, r.json()):
        want = hf_tok(text, return_offsets_mapping=True)
        assert [t["id"] for t in tokens] == want["input_ids"]
        raw = text.encode("utf-8")
        for t, (a, b), tok in zip(tokens, want["offset_mapping"], hf_tok.convert_ids_to_tokens(want["input_ids"])):
            if t["special"]:
                assert (t["text"], t["start"], t["stop"]) == (tok, None, None)
            else:  # byte offsets into the (prompted) input, and the slice they name
                assert (t["start"], t["stop"]) == (len(text[:a].encode()), len(text[:b].encode()))
                assert t["text"] == raw[t["start"]:t["stop"]].decode()
    assert any(len(t["text"].encode()) != len(t["text"]) for t in r.json()[3] if not t["special"])  # non-ASCII seen
    r = client.post("/tokenize", json={"inputs": TEXTS[0], "add_special_tokens": False})
    assert [t["id"] for t in r.json()[0]] == hf_tok(TEXTS[0], add_special_tokens=False)["input_ids"]


def test_tokenize_with_a_prompt_gives_offsets_in_the_prompted_input(minilm_dir, tmp_path, hf_tok):
    import json
    import shutil
    model = shutil.copytree(minilm_dir, tmp_path / "m")
    (model / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "query: "}}))
    with app(e5lite.load(model)) as c:
        r = c.post("/tokenize", json={"inputs": "Größe?", "prompt_name": "query"})
        tokens = r.json()[0]
        assert [t["id"] for t in tokens] == hf_tok("query: Größe?")["input_ids"]
        # the input's own characters (not the lower-cased, accent-stripped wordpieces), at UTF-8 byte offsets
        assert [t["text"] for t in tokens[1:-1]] == ["query", ":", "Gr", "ö", "ße", "?"]
        assert [(t["start"], t["stop"]) for t in tokens[1:-1]] == [(0, 5), (5, 6), (7, 9), (9, 11), (11, 14),
                                                                   (14, 15)]
        r = c.post("/tokenize", json={"inputs": "x", "prompt_name": "nope"})
        assert r.status_code == 422 and "unknown prompt_name 'nope'" in r.json()["error"]


def test_decode_equals_the_tokenizer(client, hf_tok):
    ids = [hf_tok(t)["input_ids"] for t in TEXTS[:4]]
    r = client.post("/decode", json={"ids": ids})
    assert r.json() == [hf_tok.decode(i, skip_special_tokens=True) for i in ids]
    r = client.post("/decode", json={"ids": ids[0], "skip_special_tokens": False})
    assert r.json() == [hf_tok.decode(ids[0], skip_special_tokens=False)]
    r = client.post("/decode", json={"ids": [[1, 2], [3, 999999]]})
    assert r.status_code == 422 and r.json()["error"] == "ids[1] has token id 999999, outside the vocabulary [0, 30522)"


def test_token_id_inputs_equal_the_text_they_came_from(client, hf_tok):
    # equal up to float rounding: a request's batch shapes (so the order of the float additions) depend on it
    def same(a, b):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)

    ids = [hf_tok(t, truncation=True, max_length=256)["input_ids"] for t in TEXTS]
    from_text = vectors(client.post("/embed", json={"inputs": TEXTS}))
    same(vectors(client.post("/embed", json={"inputs": ids})), from_text)
    same(vectors(client.post("/embed", json={"inputs": ids[1]})), from_text[1:2])
    mixed = vectors(client.post("/embed", json={"inputs": [TEXTS[0], ids[1], TEXTS[2]]}))
    same(mixed, from_text[:3])
    r = client.post("/v1/embeddings", json={"input": ids[:2], "model": "m"})
    got = np.array([d["embedding"] for d in r.json()["data"]], np.float32)
    same(got, from_text[:2])
    # ids past the maximum: refused with truncation off, cut with it on
    long_ids = hf_tok(TEXTS[4])["input_ids"]
    r = client.post("/embed", json={"inputs": ["ok", long_ids], "truncate": False})
    assert r.status_code == 422
    assert r.json()["error"] == (f"inputs[1] has {len(long_ids)} token ids, more than the model's maximum of 256 "
                                 "(truncation is off)")
    r = client.post("/embed", json={"inputs": [long_ids], "truncate": True})
    same(vectors(r), vectors(client.post("/embed", json={"inputs": [long_ids[:256]]})))


def test_left_truncation_equals_the_tokenizers_left_truncation(client, minilm_dir, ref):
    left = transformers.AutoTokenizer.from_pretrained(minilm_dir, truncation_side="left")
    text = TEXTS[4]
    ids = left(text, truncation=True, max_length=256)["input_ids"]
    assert ids[0] == left.cls_token_id and ids[-1] == left.sep_token_id and len(ids) == 256
    for direction in ("left", "Left"):
        r = client.post("/embed", json={"inputs": [text, TEXTS[0]], "truncate": True,
                                        "truncation_direction": direction})
        got = vectors(r)
        np.testing.assert_allclose(got[:1], vectors(client.post("/embed", json={"inputs": [ids]})), atol=1e-6, rtol=0)
        np.testing.assert_allclose(got[1:], ref.encode(TEXTS[:1]), atol=EMB_ATOL, rtol=0)  # a short text: as ever
    with torch.no_grad():  # and against the torch model on those ids
        model = transformers.AutoModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
        h = model(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0)
    np.testing.assert_allclose(got[0], (h / h.norm()).numpy(), atol=EMB_ATOL, rtol=0)
    r = client.post("/embed_all", json={"inputs": text, "truncate": True, "truncation_direction": "left"})
    np.testing.assert_allclose(np.array(r.json()[0], np.float32),
                               model(input_ids=torch.tensor([ids])).last_hidden_state[0].detach().numpy(),
                               atol=HIDDEN_ATOL, rtol=0)
    r = client.post("/embed", json={"inputs": text, "truncation_direction": "middle"})
    assert r.status_code == 422
    assert r.json()["error"] == "'truncation_direction' must be 'left' or 'right', got 'middle'"


def test_dimensions_on_embed(client, ref):
    r = client.post("/embed", json={"inputs": TEXTS[:2], "dimensions": 64})
    want = ref.encode(TEXTS[:2])[:, :64]
    np.testing.assert_allclose(vectors(r), want / np.linalg.norm(want, axis=1, keepdims=True), atol=EMB_ATOL, rtol=0)


@pytest.mark.slow
def test_long_inputs_chunk_on_the_server_equals_encode(enc):
    with app(enc, long_inputs="chunk", chunk_overlap=16) as c:
        r = c.post("/embed", json={"inputs": TEXTS})
        want = enc.encode(TEXTS, long_inputs="chunk", chunk_overlap=16)
        np.testing.assert_allclose(vectors(r), want, atol=EMB_ATOL, rtol=0)
        assert not np.allclose(want[4], enc.encode(TEXTS[4]), atol=1e-3)  # the long text really was chunked
        r = c.post("/v1/embeddings", json={"input": TEXTS[4], "model": "m"})
        assert r.json()["usage"]["prompt_tokens"] > 256  # every window's tokens
        np.testing.assert_allclose(np.array(r.json()["data"][0]["embedding"], np.float32), want[4], atol=EMB_ATOL)
        assert c.get("/info").json()["long_inputs"] == "chunk"
    with pytest.raises(ValueError, match="--chunk-overlap 254 must be less than the 254 text tokens"):
        app(enc, long_inputs="chunk", chunk_overlap=254)


def test_openapi_has_every_route_and_docs_render(client):
    doc = client.get("/openapi.json").json()
    for path, methods in {"/embed": {"post"}, "/": {"get", "post"}, "/invocations": {"post"}, "/ping": {"get"},
                          "/embeddings": {"post"}, "/v1/embeddings": {"post"}, "/embed_all": {"post"},
                          "/similarity": {"post"}, "/tokenize": {"post"}, "/decode": {"post"},
                          "/health": {"get"}, "/info": {"get"}, "/metrics": {"get"}}.items():
        assert set(doc["paths"][path]) == methods, path
    schemas = doc["components"]["schemas"]
    for path, op in ((p, o) for p, ms in doc["paths"].items() for o in ms.values()):
        for part in [op.get("requestBody", {})] + list(op["responses"].values()):
            ref = part.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
            assert ref is None or ref.rsplit("/", 1)[1] in schemas, (path, ref)
    sim = schemas["SimilarityRequest"]
    assert sim["required"] == ["inputs"] and set(sim["properties"]) == {"inputs", "parameters"}
    r = client.get("/docs")
    assert r.status_code == 200 and "swagger-ui" in r.text and "/openapi.json" in r.text
