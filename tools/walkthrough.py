"""A guided tour of the forward pass of a BERT sentence encoder, on the real all-MiniLM-L6-v2 weights.

    python tools/walkthrough.py

Every step runs e5lite's own functions (e5lite/model.py, attention.py, pooling.py; nothing is re-implemented
here), prints the shapes, and checks the intermediate result against Hugging Face transformers' BertModel
(eager attention) on the same input. The script exits with status 1 if any check fails, so CI runs it.

Shape names, as in the code: B batch, S positions (queries), T positions (keys), D hidden size, N heads,
K head size (D = N * K), F feed-forward size, L layers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

FAILURES: list[str] = []


def check(name: str, ours, theirs, atol: float) -> None:
    """Prints the largest difference from transformers' value and records a failure past ``atol``."""
    diff = float(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64)).max())
    ok = diff <= atol
    print(f"    check {name}: max |e5lite - transformers| = {diff:.2e} ({'ok' if ok else 'MISMATCH'}, "
          f"tolerance {atol:.0e})")
    if not ok:
        FAILURES.append(name)


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 100 - len(title)))


def main() -> int:
    import jax
    import torch
    import transformers

    import e5lite
    from bench import minilm_dir
    from e5lite import attention, model, pooling

    FAILURES.clear()
    folder = minilm_dir()
    enc = e5lite.load(folder)                        # config, weights (a plain pytree), tokenizer, prompts
    hf = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    config, params = enc.config, enc.params

    section("1. Tokenisation: text -> word pieces -> ids")
    text = "query: how do plants turn sunlight into energy?"
    ids = enc.tokenizer([text])[0]
    print(f"    text:        {text!r}")
    print(f"    word pieces: {enc.tokenizer.tokens(ids)}")
    print(f"    ids:         {ids.tolist()}")
    print("    [CLS] opens and [SEP] closes every text; '##' marks a piece that continues a word.")
    input_ids_BS, mask_BS = ids[None, :], np.ones((1, len(ids)), np.int32)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(input_ids_BS, dtype=torch.long), attention_mask=torch.tensor(mask_BS),
                 output_hidden_states=True, output_attentions=True)

    section("2. Embeddings: word + position + token type, then LayerNorm")
    print(f"    word table {params.embeddings.word_VD.shape} (V, D), positions {params.embeddings.position_PD.shape}"
          f" (P, D), token types {params.embeddings.token_type_YD.shape} (Y, D)")
    x_BSD = model.embed(params.embeddings, config, input_ids_BS)
    print(f"    x_BSD {x_BSD.shape}: one D = {config.hidden_size} vector per token")
    check("embeddings", x_BSD, ref.hidden_states[0], 1e-5)

    section("3. One layer opened up (layer 0)")
    p0 = jax.tree.map(lambda a: a[0], params.layers)  # the stacked [L, ...] weights, layer 0
    mask = attention.AttentionMask(mask_BS > 0)       # which keys each query may see: here, all real tokens
    print(f"    Q, K, V projections: q_DNK {p0.q_DNK.shape} = (D, N heads, K per head); the output o_NKD "
          f"{p0.o_NKD.shape}")
    h_BSD, probs_BNST = model.self_attention(p0, config, x_BSD, mask, output_attentions=True)
    print(f"    scores q.k / sqrt(K) -> softmax over keys: probabilities {probs_BNST.shape} (B, N, S, T); each "
          "row sums to 1")
    print(f"    row sums: {np.asarray(probs_BNST).sum(-1)[0, 0, :4].round(6).tolist()} ...")
    check("attention probabilities", probs_BNST[0], ref.attentions[0][0], 1e-5)
    print(f"    context = probabilities @ V, heads concatenated and projected back: {h_BSD.shape}")
    a_BSD = model.layer_norm(x_BSD + h_BSD, p0.attn_ln_scale_D, p0.attn_ln_bias_D, config.layer_norm_eps)
    print("    residual + LayerNorm: x + attention(x), normalised per token (in float32)")
    with torch.no_grad():
        hf_att = hf.encoder.layer[0].attention(ref.hidden_states[0], attention_mask=None)[0]
    check("attention block (after add & norm)", a_BSD, hf_att, 1e-5)
    f_BSD = model.feed_forward(p0, config, a_BSD)
    print(f"    feed-forward: D -> F = {config.intermediate_size} -> exact (erf) GELU -> D; GELU of 1.0 = "
          f"{float(model.activation(np.float32(1.0), config.activation)):.6f} (the tanh form gives 0.841192)")
    y_BSD = model.layer_norm(a_BSD + f_BSD, p0.ffn_ln_scale_D, p0.ffn_ln_bias_D, config.layer_norm_eps)
    check("layer 0 output", y_BSD, ref.hidden_states[1], 1e-5)
    check("model.layer, the same step in one call", model.layer(p0, config, x_BSD, mask), ref.hidden_states[1], 1e-5)

    section(f"4. All {config.num_hidden_layers} layers: lax.scan over the stacked weights")
    last_BSD, hidden_LBSD, _ = model.encoder(params.layers, config, x_BSD, mask, output_hidden_states=True)
    print(f"    one layer is compiled and applied L times; every layer's output: {hidden_LBSD.shape} (L, B, S, D)")
    for i in range(config.num_hidden_layers):
        check(f"layer {i} output", hidden_LBSD[i], ref.hidden_states[i + 1], 1e-4)
    check("last hidden state (forward)", model.forward(params, config, input_ids_BS, mask_BS), ref.last_hidden_state,
          1e-4)

    section("5. Pooling: mean over real tokens, then L2 normalisation")
    emb_BD = pooling.l2_normalize(pooling.mean_pool(last_BSD, mask_BS))
    print(f"    sentence embedding {emb_BD.shape}, norm {float(np.linalg.norm(emb_BD)):.6f}")
    last = ref.last_hidden_state
    want = torch.nn.functional.normalize(last.mean(1), dim=-1)
    check("sentence embedding", emb_BD, want, 1e-5)
    check("Encoder.encode, the whole path", enc.encode([text], prompt=""), want, 1e-5)

    section("6. E5's prompts, and why its cosines sit between 0.7 and 1.0")
    print("    E5 marks queries 'query: ' and passages 'passage: ', so the two sides can be told apart; MiniLM\n"
          f"    declares none of its own ({enc.prompts}), so E5's are passed here (prompt=)")
    q = enc.encode(["how do plants turn sunlight into energy?"], prompt="query: ")
    passages = ["Photosynthesis converts light energy into chemical energy stored in glucose.",
                "The stock market closed higher on Friday after a week of losses."]
    cos = (q @ enc.encode(passages, prompt="passage: ").T)[0]
    print(f"    MiniLM: cosine to a relevant passage {cos[0]:.3f}, to an unrelated one {cos[1]:.3f}")
    e5_like = np.array([0.86, 0.81, 0.78])  # what an E5 model typically gives: relevant, related, unrelated
    for t in (1.0, 0.05, 0.01):
        p = np.exp(e5_like / t) / np.exp(e5_like / t).sum()
        print(f"    cosines {e5_like.tolist()} -> softmax(cos / {t}) = {p.round(3).tolist()}")
    print("    E5 was trained with InfoNCE at t = 0.01 (e5lite/loss.py): a cosine gap of 0.05 is already e^5 = 148x\n"
          "    the probability, so the loss is satisfied long before unrelated texts are pushed apart, and E5's\n"
          "    cosines cluster at 0.7-1.0. Rank by them; do not read them as absolute similarity. (MiniLM was\n"
          "    trained at another temperature: its cosines spread wider.)")

    print(f"\n{len(FAILURES)} checks failed" + (f": {', '.join(FAILURES)}" if FAILURES else ", all match transformers"))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
