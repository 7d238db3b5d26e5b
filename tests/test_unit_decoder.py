import math

import pytest
import torch
from conftest import official_keys

from taste.relpos import RelPositionAttention, causal_mask, relative_sinusoids
from taste.unit_decoder import OFFICIAL_PREFIX, UnitDecoder, UnitDecoderConfig


def espnet_rel_attention(attn: RelPositionAttention, x, mask):
    """Independent reference: ESPnet's table over offsets +(T-1)..-(T-1) and the Transformer-XL rel_shift."""
    b, t, d = x.shape
    h, dk = attn.heads, attn.d_k
    pos = torch.arange(t, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float64) * -(math.log(10000.0) / d))
    pe_pos, pe_neg = torch.zeros(t, d, dtype=torch.float64), torch.zeros(t, d, dtype=torch.float64)
    pe_pos[:, 0::2], pe_pos[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    pe_neg[:, 0::2], pe_neg[:, 1::2] = torch.sin(-pos * div), torch.cos(-pos * div)
    pos_emb = torch.cat([pe_pos.flip(0), pe_neg[1:]]).to(x.dtype)  # (2T-1, d)
    q = attn.linear_q(x).view(b, t, h, dk)
    k = attn.linear_k(x).view(b, t, h, dk).transpose(1, 2)
    v = attn.linear_v(x).view(b, t, h, dk).transpose(1, 2)
    p = attn.linear_pos(pos_emb).view(-1, h, dk).transpose(0, 1)  # (H, 2T-1, dk)
    ac = (q + attn.pos_bias_u).transpose(1, 2) @ k.transpose(-1, -2)
    bd = (q + attn.pos_bias_v).transpose(1, 2) @ p.transpose(-1, -2)  # (B, H, T, 2T-1)
    padded = torch.cat([bd.new_zeros(b, h, t, 1), bd], -1).view(b, h, 2 * t, t)
    bd = padded[:, :, 1:].reshape(b, h, t, 2 * t - 1)[..., :t]
    probs = ((ac + bd) / math.sqrt(dk)).masked_fill(~mask[:, None], float("-inf")).softmax(-1)
    return attn.linear_out((probs @ v).transpose(1, 2).reshape(b, t, d))


def test_relative_attention_matches_espnet_rel_shift():
    torch.manual_seed(0)
    attn = RelPositionAttention(32, 4).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    mask = causal_mask(torch.tensor([7, 5]), 7)
    positions = torch.arange(7).expand(2, -1)
    k, v = attn.project_kv(x)
    ours = attn.attend(x, k, v, mask, positions, attn.project_positions(relative_sinusoids(7, 32, dtype=torch.float64)))
    torch.testing.assert_close(ours, espnet_rel_attention(attn, x, mask), atol=1e-12, rtol=1e-12)


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    config = UnitDecoderConfig.tiny(text_vocab=100, num_units=20, taste_dim=24, spk_dim=6, **overrides)
    return UnitDecoder(config=config).eval()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    text_cu = torch.tensor([0, 5, 7, 12], dtype=torch.int32)
    word_offsets = torch.tensor([0, 2, 5, 7, 9, 12], dtype=torch.int32)  # words 2 + 1 + 2
    unit_cu = torch.tensor([0, 10, 14, 30], dtype=torch.int32)
    return dict(
        text_tokens=torch.randint(0, 100, (12,), generator=g), text_cu_seqlens=text_cu, max_text=5,
        taste=torch.randn(5, 24, generator=g, dtype=torch.float64).float(), word_offsets=word_offsets,
        speaker=torch.randn(3, 6, generator=g), units=torch.randint(0, 20, (30,), generator=g),
        unit_cu_seqlens=unit_cu, max_units=16,
    )  # fmt: skip


def cond(b):
    return {k: b[k] for k in ("text_tokens", "text_cu_seqlens", "max_text", "taste", "word_offsets", "speaker")}


def test_blocked_attention_trains_as_the_formula():
    """The decoder's attentions a few query rows at a time (taste.ops.relpos_attention) or as the whole-score
    formula (what a problem that fits one block runs): the same loss and gradients (float64)."""
    m, b = make(), batch()
    m = m.double().train()
    b["taste"], b["speaker"] = b["taste"].double(), b["speaker"].double()
    attentions = [a for a in m.modules() if isinstance(a, RelPositionAttention)]
    results = []
    for block_elements in (100, 2**62):  # (a block: 1 to 3 query rows here)
        for a in attentions:
            a.block_elements = block_elements
        torch.manual_seed(0)  # (the same dropout masks elsewhere in the model)
        loss = m(**b).loss
        results.append((loss, torch.autograd.grad(loss, list(m.parameters()))))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-12, rtol=1e-12)
    for x, y in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-10)


def test_teacher_forcing_layout_and_targets():
    m, b = make(), batch()
    out = m(**b)
    assert out.logits.shape == (33, 21) and out.target_cu_seqlens.tolist() == [0, 11, 16, 33]
    expected = torch.cat([b["units"][0:10], torch.tensor([20]), b["units"][10:14], torch.tensor([20]),
                          b["units"][14:30], torch.tensor([20])])  # fmt: skip
    assert torch.equal(out.targets, expected)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, expected))
    prompt, plen = m.prompt(**cond(b))
    assert prompt.shape == (3, 8, 128) and plen.tolist() == [8, 5, 8]
    assert torch.equal(prompt[1, 0], m.llm_embedding.weight[0]) and torch.equal(prompt[1, 4], m.llm_embedding.weight[1])
    spk = m.spk_embed_affine_layer(torch.nn.functional.normalize(b["speaker"], dim=-1))
    torch.testing.assert_close(prompt[:, 1], spk)


def test_batch_invariance_and_causality():
    m, b = make(), batch()
    out = m(**b)
    # utterance 1 alone gives the same logits as inside the batch
    one = torch.tensor([0, 2], dtype=torch.int32)
    alone = m(text_tokens=b["text_tokens"][5:7], text_cu_seqlens=one, max_text=2, taste=b["taste"][2:3],
              word_offsets=one, speaker=b["speaker"][1:2], units=b["units"][10:14],
              unit_cu_seqlens=torch.tensor([0, 4], dtype=torch.int32), max_units=4)  # fmt: skip
    torch.testing.assert_close(alone.logits, out.logits[11:16], atol=1e-5, rtol=1e-5)
    # a later unit does not change the predictions before it
    units = b["units"].clone()
    units[20] = (units[20] + 1) % 20
    changed = m(**{**b, "units": units})
    torch.testing.assert_close(changed.logits[16 : 16 + 7], out.logits[16 : 16 + 7])
    assert not torch.allclose(changed.logits[16 + 7 :], out.logits[16 + 7 :])


def test_gradients_reach_every_branch():
    m, b = make(), batch()
    m.train()
    m(**b).loss.backward()
    for name in ("text_embedding.weight", "audio_embed_affine_layer.weight", "fuse_encoded_audio_text_module.weights",
                 "spk_embed_affine_layer.weight", "speech_embedding.weight", "llm.encoders.0.self_attn.pos_bias_v",
                 "llm_decoder.bias", "audio_token_encoder.encoders.0.feed_forward.w_1.weight"):  # fmt: skip
        assert dict(m.named_parameters())[name].grad is not None, name
    text_only = make()
    text_only(**{**b, "taste": None}).loss.backward()
    assert text_only.audio_embed_affine_layer.weight.grad is None


def test_generation_under_autocast():
    """A float32 decoder under torch.autocast (how the README runs it in bfloat16): the cached generation writes the
    16-bit keys and values into its float32 cache (it raised "scatter(): Expected self.dtype to be equal to
    src.dtype") and agrees with the uncached one."""
    m, b = make(min_len_ratio=1.0, max_len_ratio=3.0), batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cached = m.generate(**cond(b), greedy=True)
        full = m.generate(**cond(b), greedy=True, use_cache=False)
    assert len(cached) == 3 and all(x.numel() > 0 and x.dtype == torch.int64 for x in cached)
    assert all(((x >= 0) & (x < 20)).all() for x in cached)
    agree = sum(int((a == c).sum()) for a, c in zip(cached, full) if a.shape == c.shape)
    assert agree >= 0.8 * sum(x.numel() for x in full)  # (16-bit rounding may flip a near-tie between the two)


def test_greedy_with_cache_equals_without_and_teacher_forcing():
    m, b = make(min_len_ratio=1.0, max_len_ratio=3.0), batch()
    c = cond(b)
    cached = m.generate(**c, greedy=True)
    full = m.generate(**c, greedy=True, use_cache=False)
    assert [x.tolist() for x in cached] == [x.tolist() for x in full]
    # each greedy token is the argmax of the teacher-forced logits over the sequence so far
    lens = [x.numel() for x in cached]
    units = torch.cat(cached)
    ucu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    tf = m(**c, units=units, unit_cu_seqlens=ucu, max_units=max(lens))
    s = [5, 2, 5]
    for r in range(3):
        logits = tf.logits[int(tf.target_cu_seqlens[r]) : int(tf.target_cu_seqlens[r + 1])][: lens[r]].clone()
        steps = torch.arange(lens[r])
        logits[steps < math.floor(1.0 * (s[r] + 3)), 20] = float("-inf")
        assert torch.equal(logits.argmax(-1), cached[r])


def test_length_rules_and_finished_rows():
    m, b = make(min_len_ratio=2.0, max_len_ratio=3.0), batch()
    with torch.no_grad():
        m.llm_decoder.bias[20] = 1e4  # EOS wins whenever allowed: every row stops at its min length
    lens = [x.numel() for x in m.generate(**cond(b), greedy=True)]
    assert lens == [2 * (5 + 3), 2 * (2 + 3), 2 * (5 + 3)]  # EOS itself is not returned
    with torch.no_grad():
        m.llm_decoder.bias[20] = -1e4  # EOS never chosen: rows run to max length, each its own
    lens = [x.numel() for x in m.generate(**cond(b), greedy=True)]
    assert lens == [3 * 8, 3 * 5, 3 * 8]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = m.generate(**cond(b), generator=g1, max_new_tokens=6)
    assert [x.tolist() for x in a] == [x.tolist() for x in m.generate(**cond(b), generator=g2, max_new_tokens=6)]
    assert all(x.numel() == 6 for x in a)


def test_empty_batch():
    """No utterance: forward gives empty logits and targets (the mean loss over no target is NaN), generate an
    empty list, with and without the cache."""
    m, i32 = make(), torch.int32
    c = dict(text_tokens=torch.zeros(0, dtype=torch.long), text_cu_seqlens=torch.zeros(1, dtype=i32), max_text=0,
             taste=torch.zeros(0, 24), word_offsets=torch.zeros(1, dtype=i32), speaker=torch.zeros(0, 6))  # fmt: skip
    assert m.generate(**c) == [] and m.generate(**c, use_cache=False) == []
    out = m(**c, units=torch.zeros(0, dtype=torch.long), unit_cu_seqlens=torch.zeros(1, dtype=i32), max_units=0)
    assert out.logits.shape == (0, 21) and out.targets.shape == (0,) and out.target_cu_seqlens.tolist() == [0]


def test_official_parameter_names_and_shapes():
    official = {k: tuple(shape) for k, shape, _ in official_keys() if k.startswith(OFFICIAL_PREFIX)}
    with torch.device("meta"):
        ours = UnitDecoder(config=UnitDecoderConfig.official())
    mine = {OFFICIAL_PREFIX + k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == official


def test_bad_input():
    m, b = make(), batch()
    with pytest.raises(ValueError, match="word_offsets is needed"):
        m.prompt(**{**cond(b), "word_offsets": None})
    with pytest.raises(ValueError, match="divisible by heads"):
        RelPositionAttention(30, 4)
    # before: "selected index k out of range"; max_new_tokens=0 sampled one unit, -3 failed to make a tensor
    with pytest.raises(ValueError, match=r"top_k must be >= 1 or None \(the config's 25\), got 0"):
        m.generate(**cond(b), top_k=0)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"max_new_tokens must be >= 1 or None, got {bad}"):
            m.generate(**cond(b), max_new_tokens=bad)
    # each of these failed deep inside before: an embedding's "index out of range in self", a product's shapes,
    # a segment op's "y must have one row per segment", NaN probabilities from an utterance with no text
    text, units = b["text_tokens"], b["units"]
    with pytest.raises(ValueError, match=r"text_tokens must lie in \[0, text_vocab=100\), got ids in \[\d+, 100\]"):
        m(**{**b, "text_tokens": torch.where(text == text[0], 100, text)})
    with pytest.raises(ValueError, match=r"units must lie in \[0, num_units=20\), got ids in \[-1, "):
        m(**{**b, "units": torch.where(units == units[0], -1, units)})
    with pytest.raises(ValueError, match=r"unit_cu_seqlens must have text_cu_seqlens' shape \(4,\)"):
        m(**{**b, "unit_cu_seqlens": b["unit_cu_seqlens"][:3]})
    with pytest.raises(ValueError, match=r"taste must be \(W_total, taste_dim=24\), got \(5, 23\)"):
        m(**{**b, "taste": b["taste"][:, :23]})
    with pytest.raises(ValueError, match=r"word_offsets must be \(W_total \+ 1,\) = \(5,\) for taste's 4 words"):
        m(**{**b, "taste": b["taste"][:4]})
    with pytest.raises(ValueError, match=r"speaker must be \(B=3, spk_dim=6\), got \(2, 6\)"):
        m.generate(**{**cond(b), "speaker": b["speaker"][:2]})
    empty = {**cond(b), "text_cu_seqlens": torch.tensor([0, 5, 5, 12], dtype=torch.int32), "taste": None, "max_text": 7}
    with pytest.raises(ValueError, match=r"every utterance needs at least one text token, got text_cu_seqlens "
                       r"\[0, 5, 5, 12\]"):  # fmt: skip
        m.generate(**empty)


def test_compiles_fullgraph():
    m, b = make(), batch()
    eager = m(**b)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)(**b)
    torch.testing.assert_close(compiled.logits, eager.logits)
    torch.testing.assert_close(compiled.loss, eager.loss)
