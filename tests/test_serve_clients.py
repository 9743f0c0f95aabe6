"""The clients people point at a TEI or OpenAI server, against one ``e5lite serve`` process on the real
all-MiniLM-L6-v2: huggingface_hub's ``InferenceClient``, llama-index's ``TextEmbeddingsInference`` and the
``openai`` client, each compared with sentence-transformers run here on Python's own docs text. The routes
themselves, in process, are in test_serve_routes.py.

What each client sends (read from the installed sources):
- ``InferenceClient(model=URL).feature_extraction(text, **kw)``: ``POST URL`` as given (so ``POST /``),
  ``{"inputs": text, **kw}`` with the keyword arguments that are not None at the top level.
- ``InferenceClient(model=URL).sentence_similarity(s, others)``: ``POST URL`` as given, ``{"inputs":
  {"source_sentence", "sentences"}, "parameters": {}}``. TEI answers that on ``POST /`` only when started with
  ``TASK=sentence-similarity`` (else ``/`` is ``/embed``, which refuses it, as e5lite does): give the client
  ``URL/similarity``.
- ``health_check()``: ``GET URL/health``; ``get_endpoint_info()``: ``GET URL/info`` (both only with
  ``provider="hf-inference"`` named on the client).
- With ``HF_HUB_OFFLINE=1`` (as conftest sets) huggingface_hub refuses every request, to 127.0.0.1 too.
- llama-index: ``POST base_url + endpoint`` (``/embed``) with ``{"inputs": [texts], "truncate": true}``, at most
  ``embed_batch_size`` texts a request; each text is ``f"{instruction} {text}".strip()``.
- openai: ``POST base_url + "/embeddings"`` with ``{"model", "input", "encoding_format"}``: "base64" when no
  format is given (the client then decodes it to floats itself); ``dimensions``/``user`` when given.
- Keys: each sends ``Authorization: Bearer KEY`` (InferenceClient's ``api_key=``, llama-index's ``auth_token=``,
  openai's ``api_key=``). The server here wants one of two keys (``E5LITE_API_KEY``, as while rotating them),
  so every test below also checks that the client sends its key.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import inspect
import json

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
st = pytest.importorskip("sentence_transformers")
transformers = pytest.importorskip("transformers")

from test_serve import start_server, stop_server  # noqa: E402  (one copy of the process helpers)

ATOL = 1e-5  # float32 forward of two implementations
MODEL_NAME = "all-MiniLM-L6-v2"
PROMPTS = {"query": "query: ", "passage": "passage: "}
MAX_LENGTH = 256  # the model's max_seq_length
KEY, OLD_KEY = "e5lite-test-key-2", "e5lite-test-key-1"  # the server takes both: a key being rotated


def real_texts() -> tuple[list[str], list[str], str]:
    """(questions, paragraphs, a long text): Python's own docs, whitespace collapsed (llama-index strips each
    text); questions in English, German and Japanese; the long one several times past 256 tokens."""
    from pydoc_data.topics import topics

    def para(topic: str, i: int) -> str:
        return " ".join([p for p in topics[topic].split("\n\n") if len(p.split()) >= 8][i].split())

    questions = ["How do I open a file for reading?", "What does the with statement do?",
                 "Wie groß ist die Größe eines Integers? naïve café — ✓", "Python で辞書を並べ替えるには？"]
    paragraphs = [para("with", 0), para("pass", 0), para("lambda", 0), para("assert", 0), para("import", 0),
                  para("exceptions", 0), para("while", 0), para("try", 1)]
    long = " ".join((topics["exceptions"] + topics["types"]).split())
    return questions, paragraphs, long


QUESTIONS, PARAGRAPHS, LONG = real_texts()
TEXTS = QUESTIONS + PARAGRAPHS + [LONG]  # 13: llama-index sends them in three requests of at most 5


def close(got, want, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def model_dir(minilm_dir, tmp_path_factory):
    """all-MiniLM-L6-v2 with a query and a passage prompt in config_sentence_transformers.json (its other files
    linked), so that prompt_name means the same to the server and to sentence-transformers."""
    folder = tmp_path_factory.mktemp("minilm") / "model"
    folder.mkdir()
    for p in minilm_dir.iterdir():
        if p.name != "config_sentence_transformers.json":
            (folder / p.name).symlink_to(p)
    cfg_path = minilm_dir / "config_sentence_transformers.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    (folder / "config_sentence_transformers.json").write_text(json.dumps({**cfg, "prompts": PROMPTS,
                                                                          "default_prompt_name": None}))
    return folder


@pytest.fixture(scope="module")
def launched(model_dir):
    """The server starting in the background (``start_server`` waits for /health): sentence-transformers loads
    meanwhile."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = pool.submit(start_server, model_dir, "--served-model-name", MODEL_NAME,
                              env={"E5LITE_API_KEY": f"{OLD_KEY}, {KEY}"})
        yield started
        if started.exception() is None:
            out = stop_server(started.result()[0])
            assert "Traceback" not in out, out
            assert "2 API keys" in out and KEY not in out and OLD_KEY not in out  # how many, never which


@pytest.fixture(scope="module")
def ref(launched, model_dir):
    model = st.SentenceTransformer(str(model_dir), device="cpu").float()  # fp32 even from an fp16 copy
    assert model.max_seq_length == MAX_LENGTH and PROMPTS.items() <= model.prompts.items()
    return model


@pytest.fixture(scope="module")
def server(launched, ref):
    return launched.result()[1]


@pytest.fixture(scope="module")
def want(ref):
    """sentence-transformers' embeddings of TEXTS, by text."""
    return dict(zip(TEXTS, ref.encode(TEXTS)))


def wanted(want, texts):
    return np.stack([want[t] for t in texts])


@pytest.fixture(scope="module")
def hf_tok(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


# ------------------------------------------------------------------------------------------- huggingface_hub

@pytest.fixture
def hub(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    # conftest sets HF_HUB_OFFLINE=1, and huggingface_hub's HTTP session then refuses every request, a local
    # server's included
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    return hub


def feature_extraction_kwargs(hub) -> set[str]:
    return set(inspect.signature(hub.InferenceClient.feature_extraction).parameters)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["", "/embed", "/invocations"])
def test_inference_client_feature_extraction(server, want, hub, path):
    client = hub.InferenceClient(model=server + path, api_key=KEY, timeout=60)
    got = client.feature_extraction(QUESTIONS[0])
    assert got.dtype == np.float32 and got.shape == (1, 384)  # TEI answers [[...]] for one text
    close(got, wanted(want, QUESTIONS[:1]))
    close(client.feature_extraction(TEXTS), wanted(want, TEXTS))
    close(client.feature_extraction(QUESTIONS[2]), wanted(want, QUESTIONS[2:3]))  # non-ASCII


def test_inference_client_feature_extraction_parameters(server, ref, want, hub):
    client = hub.InferenceClient(model=server, api_key=KEY, timeout=60)
    kwargs = feature_extraction_kwargs(hub)
    texts = [QUESTIONS[1], PARAGRAPHS[0], LONG]
    if "normalize" in kwargs:  # the pooled vectors: sentence-transformers without the model's Normalize module
        pooled = st.SentenceTransformer(modules=[m for m in ref if type(m).__name__ != "Normalize"], device="cpu")
        close(client.feature_extraction(texts, normalize=False), pooled.encode(texts))
        close(client.feature_extraction(texts, normalize=True), wanted(want, texts))
    if "prompt_name" in kwargs:
        close(client.feature_extraction(texts, prompt_name="query"), ref.encode(texts, prompt_name="query"))
        close(client.feature_extraction(texts, prompt_name="passage"), ref.encode(texts, prompt_name="passage"))
        with pytest.raises(hub.errors.HfHubHTTPError) as e:
            client.feature_extraction(texts, prompt_name="nope")
        assert e.value.response.status_code == 422 and "unknown prompt_name 'nope'" in e.value.response.text
    if "truncate" in kwargs:
        close(client.feature_extraction(texts, truncate=True), wanted(want, texts))
        with pytest.raises(hub.errors.HfHubHTTPError) as e:
            client.feature_extraction(texts, truncate=False)
        assert e.value.response.status_code == 422
        assert e.value.response.json() == {
            "error": f"inputs[2] is longer than the model's maximum of {MAX_LENGTH} tokens (truncation is off)",
            "error_type": "Validation"}
    if "truncation_direction" in kwargs:
        close(client.feature_extraction(texts, truncate=True, truncation_direction="right"), wanted(want, texts))
        tok = ref.tokenizer
        tok.truncation_side = "left"  # sentence-transformers truncating the long text from its start
        try:
            left = ref.encode(texts)
        finally:
            tok.truncation_side = "right"
        assert not np.allclose(left[2], want[LONG], atol=1e-3)  # the direction matters for this text
        close(client.feature_extraction(texts, truncate=True, truncation_direction="left"), left)
    if "dimensions" in kwargs:  # TEI's /embed takes it too: the first N values, normalised again
        close(client.feature_extraction(texts, dimensions=64), ref.encode(texts, truncate_dim=64,
                                                                            normalize_embeddings=True))
    if "encoding_format" in kwargs:  # an OpenAI field: TEI's /embed ignores it and answers floats, as e5lite does
        close(client.feature_extraction(texts, encoding_format="base64"), wanted(want, texts))


def test_inference_client_sentence_similarity(server, ref, hub):
    if not hasattr(hub.InferenceClient, "sentence_similarity"):
        pytest.skip("this huggingface_hub has no InferenceClient.sentence_similarity")
    source, others = QUESTIONS[1], PARAGRAPHS + QUESTIONS[2:]
    client = hub.InferenceClient(model=server + "/similarity", api_key=KEY, timeout=60)
    got = client.sentence_similarity(source, others)
    assert isinstance(got, list) and len(got) == len(others)
    close(got, st.util.cos_sim(ref.encode([source]), ref.encode(others))[0].numpy())
    # POST / is /embed, as on TEI (unless TEI runs with TASK=sentence-similarity): the similarity body is refused
    with pytest.raises(hub.errors.HfHubHTTPError) as e:
        hub.InferenceClient(model=server, api_key=KEY, timeout=60).sentence_similarity(source, others)
    assert e.value.response.status_code == 422


def test_inference_client_health_and_endpoint_info(server, hub):
    # these two need the provider named (left None, it is only resolved per task): else a ValueError
    client = hub.InferenceClient(model=server, provider="hf-inference", api_key=KEY, timeout=60)
    assert client.health_check() is True
    info = client.get_endpoint_info()
    assert info["model_id"] == MODEL_NAME and info["max_input_length"] == MAX_LENGTH
    assert info["max_client_batch_size"] >= len(TEXTS)


def test_inference_client_with_a_wrong_key_is_refused(server, want, hub):
    with pytest.raises(hub.errors.HfHubHTTPError) as e:
        hub.InferenceClient(model=server, api_key="not-" + KEY, timeout=60).feature_extraction(QUESTIONS[0])
    r = e.value.response
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error_type"] == "Unauthorized" and KEY not in r.text
    # the key being rotated out still works meanwhile
    old = hub.InferenceClient(model=server, api_key=OLD_KEY, timeout=60).feature_extraction(QUESTIONS[0])
    close(old, wanted(want, QUESTIONS[:1]))


def test_async_inference_client_feature_extraction(server, want, hub):
    async def run():
        async with hub.AsyncInferenceClient(model=server, api_key=KEY, timeout=60) as client:
            return await asyncio.gather(client.feature_extraction(TEXTS[:6]), client.feature_extraction(TEXTS[6:]))

    first, second = asyncio.run(run())
    close(np.concatenate([first, second]), wanted(want, TEXTS))


# --------------------------------------------------------------------------------------------------- llama-index

@pytest.fixture(scope="module")
def llama_tei():
    return pytest.importorskip("llama_index.embeddings.text_embeddings_inference")


def test_llama_index_tei_embedder(server, want, llama_tei):
    emb = llama_tei.TextEmbeddingsInference(model_name=MODEL_NAME, base_url=server, embed_batch_size=5,
                                          auth_token=KEY)
    close(emb.get_text_embedding(PARAGRAPHS[0]), want[PARAGRAPHS[0]])
    close(emb.get_query_embedding(QUESTIONS[0]), want[QUESTIONS[0]])
    close(emb.get_query_embedding(QUESTIONS[3]), want[QUESTIONS[3]])
    batch = emb.get_text_embedding_batch(TEXTS)  # three requests: 5, 5, 3 texts
    assert len(batch) == len(TEXTS)
    close(batch, wanted(want, TEXTS))


def test_llama_index_tei_embedder_async(server, want, llama_tei):
    emb = llama_tei.TextEmbeddingsInference(model_name=MODEL_NAME, base_url=server, embed_batch_size=5,
                                          auth_token=KEY)

    async def run():
        return await asyncio.gather(emb.aget_text_embedding(PARAGRAPHS[1]), emb.aget_query_embedding(QUESTIONS[2]),
                                    emb.aget_text_embedding_batch(TEXTS))

    one, query, batch = asyncio.run(run())
    close(one, want[PARAGRAPHS[1]])
    close(query, want[QUESTIONS[2]])
    close(batch, wanted(want, TEXTS))


def test_llama_index_instructions_and_root_endpoint(server, ref, want, llama_tei):
    # "query:" + " " + text: the tokens of the model's own "query: " prompt before the text
    emb = llama_tei.TextEmbeddingsInference(model_name=MODEL_NAME, base_url=server, query_instruction="query:",
                                            text_instruction="passage:", auth_token=KEY)
    close(emb.get_query_embedding(QUESTIONS[0]), ref.encode(QUESTIONS[0], prompt_name="query"))
    close(emb.get_text_embedding(PARAGRAPHS[2]), ref.encode(PARAGRAPHS[2], prompt_name="passage"))
    root = llama_tei.TextEmbeddingsInference(model_name=MODEL_NAME, base_url=server, endpoint="/", auth_token=KEY)
    close(root.get_text_embedding_batch(PARAGRAPHS), wanted(want, PARAGRAPHS))


# -------------------------------------------------------------------------------------------------------- openai

@pytest.fixture(scope="module")
def openai():
    return pytest.importorskip("openai")


@pytest.mark.parametrize("suffix", ["/v1", ""])  # "": TEI's /embeddings alias
def test_openai_client_float_and_base64(server, want, hf_tok, openai, suffix):
    client = openai.OpenAI(base_url=server + suffix, api_key=KEY, max_retries=0, timeout=60)
    texts = TEXTS
    res = client.embeddings.create(model=MODEL_NAME, input=texts, encoding_format="float")
    assert res.model == MODEL_NAME and [d.index for d in res.data] == list(range(len(texts)))
    close([d.embedding for d in res.data], wanted(want, texts))
    tokens = sum(len(hf_tok(t, truncation=True, max_length=MAX_LENGTH)["input_ids"]) for t in texts)
    assert res.usage.prompt_tokens == res.usage.total_tokens == tokens
    # no encoding_format: the client asks for base64 and decodes it to floats itself
    res = client.embeddings.create(model=MODEL_NAME, input=texts)
    assert all(isinstance(d.embedding, list) for d in res.data)
    close([d.embedding for d in res.data], wanted(want, texts))
    res = client.embeddings.create(model=MODEL_NAME, input=QUESTIONS[2])  # one text, non-ASCII
    close([d.embedding for d in res.data], wanted(want, QUESTIONS[2:3]))
    res = client.embeddings.create(model=MODEL_NAME, input=texts, encoding_format="base64")
    assert all(isinstance(d.embedding, str) for d in res.data)
    close([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in res.data], wanted(want, texts))


def test_openai_client_dimensions(server, ref, openai):
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)
    texts = QUESTIONS + PARAGRAPHS[:2]
    for dims in (32, 128, 384):
        res = client.embeddings.create(model=MODEL_NAME, input=texts, dimensions=dims)
        got = np.array([d.embedding for d in res.data], np.float32)
        assert got.shape == (len(texts), dims)
        close(got, ref.encode(texts, truncate_dim=dims, normalize_embeddings=True))
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL_NAME, input=texts, dimensions=385)
    assert e.value.status_code == 400 and e.value.body["param"] == "dimensions"


def test_openai_client_token_ids_equal_their_text(server, want, hf_tok, openai):
    """Token ids from transformers' tokenizer ([CLS] ... [SEP], cut to 256) embed as the text they came from."""
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)
    texts = [QUESTIONS[0], QUESTIONS[3], PARAGRAPHS[0], LONG]
    ids = [hf_tok(t, truncation=True, max_length=MAX_LENGTH)["input_ids"] for t in texts]
    res = client.embeddings.create(model=MODEL_NAME, input=ids)
    close([d.embedding for d in res.data], wanted(want, texts))
    assert res.usage.prompt_tokens == sum(len(i) for i in ids)
    res = client.embeddings.create(model=MODEL_NAME, input=ids[1], encoding_format="float")  # one id list
    assert len(res.data) == 1
    close(res.data[0].embedding, want[texts[1]])
    # past the maximum: cut to it, as the text is (the server truncates by default)
    long_ids = hf_tok(LONG)["input_ids"]
    assert len(long_ids) > 2 * MAX_LENGTH
    res = client.embeddings.create(model=MODEL_NAME, input=[long_ids[:MAX_LENGTH - 1] + [hf_tok.sep_token_id]])
    close(res.data[0].embedding, want[LONG])


def test_openai_client_with_a_wrong_key_raises_authentication_error(server, openai):
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY[:-1], max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as e:
        client.embeddings.create(model=MODEL_NAME, input=QUESTIONS[0])
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    assert e.value.response.headers["www-authenticate"] == "Bearer"


def test_async_openai_client(server, want, openai):
    async def run():
        client = openai.AsyncOpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)
        async with client:
            return await asyncio.gather(*(client.embeddings.create(model=MODEL_NAME, input=[t]) for t in TEXTS))

    results = asyncio.run(run())
    close([r.data[0].embedding for r in results], wanted(want, TEXTS))
