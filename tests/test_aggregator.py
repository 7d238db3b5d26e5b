"""TextQueryAggregator against transformers' own WhisperDecoder with the same weights."""

import copy

import pytest
import torch
from conftest import DEVICES, HAS_CUDA, make_cu

from taste import AggregatorConfig, TextQueryAggregator, aggregator, ops, ops_attention
from taste.aggregator import OFFICIAL_PREFIX, balanced_chunk

transformers = pytest.importorskip("transformers")
from transformers import WhisperConfig  # noqa: E402
from transformers.models.whisper.modeling_whisper import WhisperDecoder  # noqa: E402

PREFIX = (996, 997, 998, 999)


def whisper_decoder(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = WhisperConfig(
        vocab_size=1000,
        d_model=64,
        decoder_attention_heads=2,
        decoder_layers=2,
        decoder_ffn_dim=128,
        max_target_positions=96,
        encoder_layers=1,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        max_source_positions=50,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=996,
    )
    return WhisperDecoder(cfg).eval().to(dtype)


class ValuesFrom(torch.nn.Module):
    """Makes a Whisper cross-attention take its values from other states (the key source stays the input)."""

    def __init__(self, proj, states):
        super().__init__()
        self.proj, self.states = proj, states

    def forward(self, _ignored):
        return self.proj(self.states)


def hf_reference(decoder, tokens, cu, h_key, h_val):
    """One utterance at a time through transformers' WhisperDecoder, prefix prepended, prefix outputs dropped."""
    outs = []
    for b in range(cu.numel() - 1):
        ids = torch.cat([torch.tensor(PREFIX), tokens[cu[b] : cu[b + 1]]])[None]
        originals = [layer.encoder_attn.v_proj for layer in decoder.layers]
        for layer, proj in zip(decoder.layers, originals):
            layer.encoder_attn.v_proj = ValuesFrom(proj, h_val[b : b + 1])
        try:
            hidden = decoder(input_ids=ids, encoder_hidden_states=h_key[b : b + 1]).last_hidden_state
        finally:
            for layer, proj in zip(decoder.layers, originals):
                layer.encoder_attn.v_proj = proj
        outs.append(hidden[0, len(PREFIX) :])
    return torch.cat(outs)


def batch(lengths, frames=50, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 990, (sum(lengths),), generator=gen)
    h_key = torch.randn(len(lengths), frames, 64, generator=gen, dtype=dtype)
    h_val = torch.randn(len(lengths), frames, 64, generator=gen, dtype=dtype)
    return tokens, make_cu(lengths), h_key, h_val


def force_path(monkeypatch, path=None):
    """Forces the CPU cross-attention's path: "fold" (K/V projections folded into the queries and outputs),
    "project" (K/V made from every frame) or None (the default rule). Returns a list that grows by one each time a
    cross-attention folds."""
    if path is not None:
        monkeypatch.setattr(ops_attention, "FOLD_RATIO", 1e9 if path == "fold" else 0.0)
    folded = []
    real = ops_attention.text_query_cross_attention_folded

    def counted(*args, **kwargs):
        folded.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(aggregator, "text_query_cross_attention_folded", counted)
    return folded


@pytest.mark.parametrize("path", ["fold", "project"])
@pytest.mark.parametrize("lengths", [[1], [5, 1, 9], [30, 2, 17, 1]])
def test_matches_whisper_decoder_with_separate_key_and_value_states(lengths, path, monkeypatch):
    decoder = whisper_decoder()
    agg = TextQueryAggregator.from_whisper_decoder(decoder, prefix_ids=PREFIX, identity_v_proj=False)
    tokens, cu, h_key, h_val = batch(lengths)
    folded = force_path(monkeypatch, path)
    with torch.no_grad():  # (in training with frozen states the aggregator never folds)
        out = agg(tokens, cu, max(lengths), h_key, h_val)
        assert out.shape == (sum(lengths), 64) and out.dtype == torch.float64
        torch.testing.assert_close(out, hf_reference(decoder, tokens, cu, h_key, h_val), atol=1e-12, rtol=1e-12)
        # Same states for keys and values: the unmodified transformers decoder.
        out_same = agg(tokens, cu, max(lengths), h_key, h_key)
        torch.testing.assert_close(out_same, hf_reference(decoder, tokens, cu, h_key, h_key), atol=1e-12, rtol=1e-12)
    assert len(folded) == (4 if path == "fold" else 0)  # 2 layers x 2 calls


def test_identity_v_proj_and_config_from_decoder():
    agg = TextQueryAggregator.from_whisper_decoder(whisper_decoder(), prefix_ids=PREFIX)
    cfg = agg.config
    assert (cfg.d_model, cfg.num_heads, cfg.num_layers, cfg.ffn_dim, cfg.max_positions) == (64, 2, 2, 128, 96)
    for layer in agg.layers:
        assert torch.equal(layer.encoder_attn.v_proj.weight, torch.eye(64, dtype=torch.float64))
        assert torch.equal(layer.encoder_attn.v_proj.bias, torch.zeros(64, dtype=torch.float64))
        assert layer.encoder_attn.k_proj.bias is None and layer.self_attn.k_proj.bias is None
    official = AggregatorConfig.distil_large_v3()
    assert (official.d_model, official.num_heads, official.num_layers, official.ffn_dim) == (1280, 20, 2, 5120)
    assert official.max_positions == 448 and official.prefix_ids == (50258, 50259, 50360, 50364)


def test_remap_vocabulary_averages_the_rows_that_spell_each_new_token():
    agg = TextQueryAggregator.from_whisper_decoder(whisper_decoder(), prefix_ids=PREFIX)
    old = agg.embed_tokens.weight.detach().clone()
    tokens, cu = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 2, 4], dtype=torch.int32)
    h = torch.randn(2, 30, 64, dtype=torch.float64)
    agg.remap_vocabulary([(5,), (7, 8, 9), (), (5,)])  # new ids 0-3, then the 4 prefix rows
    table = agg.embed_tokens.weight
    assert agg.config.vocab_size == table.shape[0] == 8 and agg.config.prefix_ids == (4, 5, 6, 7)
    assert agg.prefix_ids.tolist() == [4, 5, 6, 7] and table.dtype == torch.float64 and table.requires_grad
    assert torch.equal(table[0], old[5]) and torch.equal(table[3], old[5]) and torch.equal(table[4:], old[996:])
    torch.testing.assert_close(table[1], old[7:10].mean(0))
    torch.testing.assert_close(table[2], old[[5, 7, 8, 9]].mean(0))  # a special token: every row that spells one
    # The module with the old vocabulary gives the same outputs for the ids the new ones stand for one to one.
    plain = TextQueryAggregator.from_whisper_decoder(whisper_decoder(), prefix_ids=PREFIX)
    one = torch.tensor([0, 3], dtype=torch.int32)
    torch.testing.assert_close(agg(torch.tensor([0, 3, 0]), one, 3, h[:1], h[:1]),
                               plain(torch.tensor([5, 5, 5]), one, 3, h[:1], h[:1]))  # fmt: skip
    assert agg(tokens, cu, 2, h, h).shape == (4, 64)
    with pytest.raises(ValueError, match=r"ids in \[0, 8\) \(the current vocabulary\), got ids from 0 to 8"):
        agg.remap_vocabulary([(0,), (8,)])
    with pytest.raises(ValueError, match="pieces must spell at least one token"):
        agg.remap_vocabulary([(), ()])
    with pytest.raises(ValueError, match="give prefix_ids or language, not both"):
        TextQueryAggregator.from_whisper_decoder(whisper_decoder(), prefix_ids=PREFIX, language="de")
    with pytest.raises(ValueError, match="vocab_size=2000 differs from the decoder's 1000"):  # (before: a size
        TextQueryAggregator.from_whisper_decoder(whisper_decoder(), prefix_ids=PREFIX, vocab_size=2000)  # mismatch)


def test_official_checkpoint_keys_load():
    agg = TextQueryAggregator(config=AggregatorConfig.tiny())
    state = {OFFICIAL_PREFIX + k: torch.randn_like(v) for k, v in agg.state_dict().items()}
    state["audio_tower.vq.rvq.project_in.weight"] = torch.zeros(1)  # other parts of the checkpoint are skipped
    agg.load_official_state_dict(state)
    assert torch.equal(agg.layers[1].fc2.weight, state[OFFICIAL_PREFIX + "layers.1.fc2.weight"])


@pytest.mark.parametrize("device", DEVICES)
def test_batch_invariance_of_word_embeddings(device):
    dtype = torch.float32
    agg = TextQueryAggregator(config=AggregatorConfig.tiny()).to(device)
    lengths = [7, 12, 1, 30]
    tokens, cu, h_key, h_val = batch(lengths, frames=80, dtype=dtype)
    tokens, cu, h_key, h_val = tokens.to(device), cu.to(device), h_key.to(device), h_val.to(device)
    word_ids = torch.tensor([0, 0, 1, 2, 2, 2, 3] + list(range(12)) + [0] + [i // 3 for i in range(30)], device=device)
    offsets = ops.word_offsets(word_ids, cu)
    words = ops.segment_mean(agg(tokens, cu, 30, h_key, h_val), offsets)
    b = 1  # the second utterance alone
    alone_cu = make_cu([12], device)
    alone = agg(tokens[7:19], alone_cu, 12, h_key[b : b + 1], h_val[b : b + 1])
    alone_words = ops.segment_mean(alone, ops.word_offsets(word_ids[7:19], alone_cu))
    first_word = 4  # the first utterance has 4 words
    torch.testing.assert_close(words[first_word : first_word + 12], alone_words, atol=2e-5, rtol=1e-5)


def test_compiles_fullgraph_and_trains(monkeypatch):
    """Compiled whole: training with projected K/V and with folded projections (states with gradients), and
    inference with K/V made one utterance at a time."""
    agg = TextQueryAggregator(config=AggregatorConfig.tiny())
    folded = force_path(monkeypatch)
    tokens, cu, h_key, h_val = batch([5, 9, 2], frames=40, dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(agg, fullgraph=True, backend="aot_eager")
    eager = agg(tokens, cu, 9, h_key, h_val)
    got = compiled(tokens, cu, 9, h_key, h_val)
    torch.testing.assert_close(got, eager)
    assert not folded and ops.cross_attention_folds(9 + 4, 2, 64, 40, h_key.device)
    states = [h.clone().requires_grad_() for h in (h_key, h_val)]  # folds: the states need gradients too
    out = compiled(tokens, cu, 9, *states)
    torch.testing.assert_close(out, eager, atol=2e-5, rtol=1e-5)
    out.sum().backward()
    assert folded and all(h.grad.abs().sum() > 0 for h in states)
    agg.fold_kv, agg.kv_chunk_frames = False, 40  # inference: K/V one utterance at a time, also compiled whole
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens, cu, 9, h_key, h_val), eager, atol=2e-5, rtol=1e-5)
    agg.zero_grad()
    got.square().mean().backward()
    grads = [p.grad for p in agg.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_balanced_chunks():
    for count, most, expected in ((64, 16, 16), (17, 16, 9), (65, 16, 13), (5, 4, 3), (3, 10, 3), (1, 0, 1), (0, 4, 1)):
        assert balanced_chunk(count, most) == expected, (count, most)
        if count:  # as few chunks as the bound allows, none above it
            assert -(-count // expected) == -(-count // max(1, min(count, most))) and expected <= max(most, 1)


@pytest.mark.parametrize("device", DEVICES)
def test_inference_kv_chunks_equal_the_whole_batch_and_training_is_unchunked(device, monkeypatch):
    """Without gradients K/V are made kv_chunk_frames at a time (here one or two utterances, and one frame:
    still one utterance); the output equals the unchunked one. With gradients the differentiable path runs."""
    agg = TextQueryAggregator(config=AggregatorConfig.tiny()).to(device)
    assert agg.kv_chunk_frames == "auto"
    agg.fold_kv = False  # (folded, the CPU makes no K/V to chunk)
    assert agg.resolved_kv_chunk_frames(torch.device(device)) == (24576 if device == "cuda" else 6000)
    tokens, cu, h_key, h_val = (t.to(device) for t in batch([7, 0, 12, 1, 30], frames=40, dtype=torch.float32))
    chunked = []
    real = ops_attention.text_query_cross_attention
    monkeypatch.setattr(aggregator, "text_query_cross_attention", lambda *a, **k: chunked.append(k) or real(*a, **k))
    with torch.no_grad():
        agg.kv_chunk_frames = None
        whole = agg(tokens, cu, 30, h_key, h_val)
        assert [c["chunk_size"] for c in chunked] == [5, 5]  # 2 layers, every utterance's K/V at once
        # 160 frames: at most 4 utterances, in two chunks of 3 and 2 (not 4 and 1)
        for frames, per_chunk in ((40, 1), (80, 2), (160, 3), (1, 1)):
            agg.kv_chunk_frames = frames
            torch.testing.assert_close(agg(tokens, cu, 30, h_key, h_val), whole, atol=2e-5, rtol=1e-5)
            assert chunked[-1]["chunk_size"] == per_chunk
        agg.kv_chunk_frames = 200  # room for all 5 utterances: one chunk, as with None
        assert torch.equal(agg(tokens, cu, 30, h_key, h_val), whole) and chunked[-1]["chunk_size"] == 5
    n = len(chunked)
    agg.kv_chunk_frames = 40
    out = agg(tokens, cu, 30, h_key, h_val)
    assert len(chunked) == n  # gradients needed: the unchunked, differentiable path
    torch.testing.assert_close(out, whole, atol=2e-5, rtol=1e-5)
    out.square().mean().backward()
    assert agg.layers[0].encoder_attn.k_proj.weight.grad.abs().sum() > 0


class Shifted(torch.nn.Linear):
    """A Linear whose forward adds 0.25: a subclass (as an adapter would be) whose weight is not its function."""

    def forward(self, x):
        return super().forward(x) + 0.25


@pytest.mark.parametrize("change", ["hook", "subclass", "lora"])
def test_projection_wrappers_and_hooks_are_called_on_every_path(change, monkeypatch):
    """The folded and chunked cross-attentions use k_proj / v_proj weights in place of the modules; where a module is
    not a plain Linear (a LoRA adapter, a subclass) or has a hook, every path calls the modules and gives what the
    modified modules compute (the differentiable path, which always calls them, is the reference)."""
    agg = TextQueryAggregator(config=AggregatorConfig.tiny()).double()
    plain = copy.deepcopy(agg)
    calls = []
    if change == "lora":  # peft's adapters on the cross-attention's projections (B initialised non-zero)
        peft = pytest.importorskip("peft")
        config = peft.LoraConfig(r=4, target_modules=["encoder_attn.k_proj", "encoder_attn.v_proj"],
                                 init_lora_weights=False)  # fmt: skip
        agg = peft.inject_adapter_in_model(config, agg)
    for layer in agg.layers:
        attn = layer.encoder_attn
        if change == "lora":
            assert type(attn.k_proj).__name__ == "Linear" and type(attn.k_proj) is not torch.nn.Linear
        elif change == "hook":
            attn.k_proj.register_forward_hook(lambda module, args, out: calls.append(1) or out * 1.5)
        else:
            shifted = Shifted(64, 64).double()
            shifted.load_state_dict(attn.v_proj.state_dict())
            attn.v_proj = shifted
    folded = force_path(monkeypatch)
    tokens, cu, h_key, h_val = batch([5, 9, 2], frames=40)
    want = agg(tokens, cu, 9, h_key, h_val)  # gradients on: the modules run
    assert not torch.allclose(plain(tokens, cu, 9, h_key, h_val), want)  # the change changes the output
    with torch.no_grad():
        for fold_kv, chunk in ((True, None), (False, 40), (False, None)):  # would fold; would chunk; at once
            agg.fold_kv, agg.kv_chunk_frames = fold_kv, chunk
            del calls[:]
            torch.testing.assert_close(agg(tokens, cu, 9, h_key, h_val), want, atol=1e-12, rtol=1e-12)
            assert len(calls) == (2 if change == "hook" else 0) and not folded


def test_folds_where_utterances_are_short_at_inference_and_with_state_gradients(monkeypatch):
    """With the default rule: a batch of short utterances folds the K/V projections at inference and in training
    where the encoder states need gradients, and projects them in training with frozen states; one long utterance
    makes the batch project them; fold_kv=False always projects. Outputs and gradients agree across the paths
    (float64)."""
    agg = TextQueryAggregator(config=AggregatorConfig.tiny()).double()
    folded = force_path(monkeypatch)
    assert agg.fold_kv is True and ops_attention.FOLD_RATIO == 0.85
    short = batch([5, 9, 2, 20], frames=40)  # at most 24 queries with the prefix: 24 x 2 heads < 0.85 x 64
    long = batch([5, 9, 2, 24], frames=40)  # 28 x 2 >= 0.85 x 64
    for (tokens, cu, h_key, h_val), short_batch in ((short, True), (long, False)):
        for state_grads in (True, False):
            runs = {}
            for fold_kv in (True, False):
                agg.fold_kv = fold_kv
                agg.zero_grad()
                h_key.grad = h_val.grad = None
                del folded[:]
                with torch.no_grad():
                    inference = agg(tokens, cu, int(cu.diff().max()), h_key, h_val)
                assert len(folded) == (2 if fold_kv and short_batch else 0)  # 2 layers
                del folded[:]
                out = agg(tokens, cu, int(cu.diff().max()), h_key.requires_grad_(state_grads),
                          h_val.requires_grad_(state_grads))  # fmt: skip
                out.square().mean().backward()
                folds = fold_kv and short_batch and state_grads
                assert len(folded) == (2 if folds else 0), (fold_kv, short_batch, state_grads)
                torch.testing.assert_close(inference, out, atol=1e-12, rtol=1e-12)
                runs[fold_kv] = [out] + [p.grad for p in agg.parameters()]
                runs[fold_kv] += [h_key.grad, h_val.grad] if state_grads else []
            for a, b in zip(runs[True], runs[False]):
                torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("grad", [False, True])
def test_empty_batches(grad):
    """No utterance at all, and utterances without text: (0, d) out, chunked or not."""
    agg = TextQueryAggregator(config=AggregatorConfig.tiny())
    d = agg.config.d_model
    with torch.set_grad_enabled(grad):
        for batch in (0, 2):
            h = torch.randn(batch, 10, d)
            out = agg(torch.zeros(0, dtype=torch.long), torch.zeros(batch + 1, dtype=torch.int32), 0, h, h)
            assert out.shape == (0, d)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_gpu_bf16_matches_float64():
    decoder = whisper_decoder()
    ref_agg = TextQueryAggregator.from_whisper_decoder(decoder, prefix_ids=PREFIX, identity_v_proj=False)
    agg = TextQueryAggregator.from_whisper_decoder(decoder, prefix_ids=PREFIX, identity_v_proj=False)
    agg = agg.to("cuda", torch.bfloat16)
    tokens, cu, h_key, h_val = batch([40, 3, 77])
    ref = ref_agg(tokens, cu, 77, h_key, h_val)
    out = agg(tokens.cuda(), cu.cuda(), 77, h_key.cuda().bfloat16(), h_val.cuda().bfloat16())
    assert (out.double().cpu() - ref).abs().max().item() < 0.1  # bf16 through 2 layers of LayerNorm outputs


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_gpu_forward_and_backward_make_no_host_sync():
    """Issue 3: no host syncs in forward. Under torch.cuda.set_sync_debug_mode("error") any device-to-host read or
    synchronising copy raises: inference with K/V at once and one utterance at a time, word pooling, and a training
    step's forward and backward (after a warm-up call each: Triton compiles, and an autotuner would time, there)."""
    agg = TextQueryAggregator(config=AggregatorConfig.tiny()).to("cuda", torch.bfloat16)
    tokens, cu, h_key, h_val = (t.cuda() for t in batch([5, 9, 2], frames=40, dtype=torch.bfloat16))
    offsets = ops.word_offsets(torch.tensor([0, 0, 1, 2, 2, 0, 1, 1, 2, 3, 4, 4, 5, 5, 0, 1], device="cuda",
                                            dtype=torch.int32), cu)  # fmt: skip

    def inference(chunk):
        agg.kv_chunk_frames = chunk
        with torch.no_grad():
            return ops.segment_mean(agg(tokens, cu, 9, h_key, h_val), offsets)

    def training():
        states = [h.clone().requires_grad_() for h in (h_key, h_val)]
        out = ops.segment_mean(agg(tokens, cu, 9, *states), offsets)
        out.float().square().mean().backward()
        return out.detach()

    for run in (lambda: inference(None), lambda: inference(40), training):
        want = run()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.testing.assert_close(got, want)


def test_bad_input():
    agg = TextQueryAggregator(config=AggregatorConfig.tiny())
    tokens, cu, h_key, h_val = batch([5, 9], dtype=torch.float32)
    with pytest.raises(ValueError, match=r"with the 4 prefix tokens, <= max_positions=96, got max_seqlen=93"):
        agg(tokens, cu, 93, h_key, h_val)
    with pytest.raises(ValueError, match=r"max_seqlen must be >= 0"):
        agg(tokens, cu, -1, h_key, h_val)
    # in the caller's terms, not the ops' (which count the prefix): before, "a sequence of 13 rows ... max_seqlen=12"
    with pytest.raises(ValueError, match=r"max_seqlen=8 is shorter than the longest sequence in cu_seqlens \(9 tok"):
        agg(tokens, cu, 8, h_key, h_val)
    with pytest.raises(RuntimeError, match=r"cu_seqlens must be non-decreasing"):  # not "max_seqlen is shorter"
        agg(tokens, torch.tensor([0, 20, 14], dtype=torch.int32), 9, h_key, h_val)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=1000\), got ids in \[\d+, 1000\]"):
        agg(torch.where(tokens == tokens[3], 1000, tokens), cu, 9, h_key, h_val)  # before: IndexError from embedding
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=1000\), got ids in \[-1, "):
        agg(torch.where(tokens == tokens[3], -1, tokens), cu, 9, h_key, h_val)
    with pytest.raises(ValueError, match=r"h_key must be on the module's device \(cpu\), got meta"):
        agg(tokens, cu, 9, h_key.to("meta"), h_val.to("meta"))
    with pytest.raises(ValueError, match=r"h_key and h_val must both be"):
        agg(tokens, cu, 9, h_key, h_val[:, :10])
    with pytest.raises(ValueError, match=r"cu_seqlens must have B \+ 1 = 2 entries"):
        agg(tokens, cu, 9, h_key[:1], h_val[:1])
    # before: "expected m1 and m2 to have the same dtype" from inside a projection
    with pytest.raises(TypeError, match=r"h_key and h_val must have the module's dtype \(torch.float32\) outside "
                       r"torch.autocast, got torch.bfloat16 and torch.bfloat16"):  # fmt: skip
        agg(tokens, cu, 9, h_key.bfloat16(), h_val.bfloat16())
    with pytest.raises(TypeError, match=r"got torch.float32 and torch.float64"):
        agg(tokens, cu, 9, h_key, h_val.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts them itself
        assert agg(tokens, cu, 9, h_key.bfloat16(), h_val.bfloat16()).shape == (tokens.shape[0], 64)
    with pytest.raises(ValueError, match=r"skip_prefix must equal"):
        TextQueryAggregator(config=AggregatorConfig.tiny(skip_prefix=2))


def test_autocast_reaches_every_path(monkeypatch):
    """Under torch.autocast a float32 aggregator runs its projections and attention in bfloat16 on every path: the
    folded and chunked cross-attentions (custom ops that autocast does not reach by itself, which refused the
    bfloat16 queries against float32 weights and states) give what the modules' path gives, compiled too; the
    folded path's gradients reach the float32 states and weights."""
    agg = TextQueryAggregator(config=AggregatorConfig.tiny())
    folded = force_path(monkeypatch)
    tokens, cu, h_key, h_val = batch([5, 9, 2], frames=40, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = agg(tokens, cu, 9, h_key, h_val)  # gradients on, frozen states: the modules run, autocast applies
        assert not folded
        with torch.no_grad():
            for fold_kv, chunk in ((True, None), (False, 40), (False, None)):  # folds; K/V per utterance; at once
                agg.fold_kv, agg.kv_chunk_frames = fold_kv, chunk
                torch.testing.assert_close(agg(tokens, cu, 9, h_key, h_val), want, atol=3e-2, rtol=2e-2)
            assert len(folded) == 2  # (both layers folded once)
            torch._dynamo.reset()
            compiled = torch.compile(agg, fullgraph=True, backend="aot_eager")
            torch.testing.assert_close(compiled(tokens, cu, 9, h_key, h_val), want, atol=3e-2, rtol=2e-2)
        agg.fold_kv, agg.kv_chunk_frames = True, None
        states = [h.clone().requires_grad_() for h in (h_key, h_val)]
        out = agg(tokens, cu, 9, *states)  # training with state gradients: folds
        assert len(folded) == 4
        out.square().mean().backward()
    torch.testing.assert_close(out, want, atol=3e-2, rtol=2e-2)
    assert all(h.grad.dtype == torch.float32 and h.grad.isfinite().all() and h.grad.abs().sum() > 0 for h in states)
    k_grad = agg.layers[0].encoder_attn.k_proj.weight.grad
    assert k_grad.dtype == torch.float32 and k_grad.abs().sum() > 0
