"""Batched KV-cached TASLM generation (spec 2.7): cache == full re-run, batch == one by one, the state machine
agrees with the training layout, stop rules, sampler tables, sampling, compile."""

import pytest
import torch
from conftest import require_taslm_dependencies

require_taslm_dependencies()

from test_spoken_lm import batch, make  # noqa: E402

from taste.generate import GenerationConfig, sampler_tables, top_p_filter  # noqa: E402
from taste.text import llama3_encoding  # noqa: E402

GREEDY = GenerationConfig(extra_words=3, text_top_p=0.0, max_new_tokens=24)


@pytest.fixture(scope="module", params=["latent", "classifier"])
def model(request):
    return make(request.param, seed=2)


def prompt(seed=1):
    tokens, word_ids, codes, cu = batch(seed=seed)
    return tokens, word_ids, codes, cu


def test_sampler_tables_follow_the_spec():
    enc = llama3_encoding()
    t = sampler_tables("llama3")
    assert t.word_start.numel() == enc.n_vocab == 128256
    (hello,) = enc.encode_ordinary(" Hello")
    (bare,) = enc.encode_ordinary("Hello")
    (dot,) = enc.encode_ordinary(".")
    (bang,) = enc.encode_ordinary("!")
    (newline,) = enc.encode_ordinary("\n")
    assert t.word_start[hello] and not t.word_start[bare] and t.word_start[128000]
    assert not t.ban[hello] and not t.ban[dot] and t.ban[bang] and t.ban[newline] and t.ban[128001]
    assert t.sentence_end[dot] and t.sentence_end[enc.encode_ordinary("...")[0]] and not t.sentence_end[hello]
    assert sampler_tables("llama3") is t  # built once per tokenizer
    bigger = sampler_tables("llama3", 128300)
    assert bigger.ban[128256:].all()


def test_sampler_tables_of_a_sentencepiece_tokenizer_directory(tmp_path):
    """Decoding one SentencePiece token drops its leading space: no token of such a tokenizer was a word start (the
    state machine then never saw a word begin), and its special tokens were neither banned nor word starts."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581Hello": 3, "\u2581wor": 4, "ld": 5, ".": 6, "<0x0A>": 7, "!": 8}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>", bos_token="<s>", eos_token="</s>",
    )  # fmt: skip
    tok.save_pretrained(tmp_path)
    t = sampler_tables(str(tmp_path), eos_id=2)
    assert t.word_start.tolist() == [True, True, True, True, True, False, False, False, False]
    assert t.ban.tolist() == [True, True, True, False, False, False, False, True, True]
    assert t.sentence_end.tolist() == [False] * 6 + [True, False, False]


def test_top_p_filter_keeps_the_smallest_head():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.9, 0.05, 0.03, 0.02]]))
    out = top_p_filter(logits, 0.7)
    # cumulative 0.5, 0.8 (> 0.7: dropped), ...; the top-1 always stays
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]
    assert torch.isfinite(out[1]).tolist() == [True, False, False, False]
    out = top_p_filter(logits, 0.85)
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]


def test_greedy_with_cache_equals_full_rerun(model):
    tokens, word_ids, codes, cu = prompt()
    args = (torch.cat(tokens), cu, torch.cat(word_ids), torch.cat(codes))
    a = model.generate(*args, config=GREEDY)
    b = model.generate(*args, config=GREEDY, use_cache=False)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.codes, b.codes)
    assert torch.equal(a.word_start, b.word_start) and torch.equal(a.num_words, b.num_words)
    assert (a.num_words > 0).all()


def test_batch_equals_one_by_one(model):
    tokens, word_ids, codes, cu = prompt()
    out = model.generate(torch.cat(tokens), cu, torch.cat(word_ids), torch.cat(codes), config=GREEDY)
    for i, (t, w, c) in enumerate(zip(tokens, word_ids, codes)):
        one = model.generate(t, torch.tensor([0, len(t)], dtype=torch.int32), w, c, config=GREEDY)
        n = one.tokens.shape[1]
        assert torch.equal(one.tokens[0], out.tokens[i, :n]) and (out.tokens[i, n:] == -1).all()
        assert torch.equal(one.codes[0], out.codes[i]) and one.num_words[0] == out.num_words[i]


def test_generation_agrees_with_the_training_layout(model):
    """Teacher forcing the prompt + generated words through the training layout reproduces every greedy choice:
    each text token is the (ban-masked) argmax at its row, each code row the prediction at its word's row."""
    tokens, word_ids, codes, cu = prompt(seed=5)
    t, w, c = tokens[0], word_ids[0], codes[0]
    out = model.generate(t, torch.tensor([0, len(t)], dtype=torch.int32), w, c, config=GREEDY)
    gen = out.tokens[0][out.tokens[0] >= 0]
    starts = out.word_start[0][: gen.numel()]
    gen_words = int(w[-1]) + 1 + torch.cumsum(starts.long(), 0) - 1
    full_t, full_w = torch.cat([t, gen]), torch.cat([w, gen_words.int()])
    full_c = torch.cat([c, out.codes[0, : int(out.num_words[0])]])
    with torch.no_grad():
        h, layout = model.hidden_states(full_t, torch.tensor([0, len(full_t)], dtype=torch.int32), full_w, full_c)
        tables = sampler_tables("llama3")
        logits = model.lm_head(h[len(t) : len(full_t)]).float().masked_fill(tables.ban, float("-inf"))
        logits[0] = logits[0].masked_fill(~tables.word_start, float("-inf"))
        assert torch.equal(logits.argmax(-1), gen)
        rows = torch.argsort(torch.where(layout.label_word >= 0, layout.label_word, 10**6), stable=True)
        rows = rows[c.shape[0] : full_c.shape[0]]  # the rows that predict the generated words' codes
        assert torch.equal(model.predict_codes(h[rows]), full_c[c.shape[0] :])


def test_stop_rules_and_text_prompt():
    model = make("latent", seed=2)
    tables = sampler_tables("llama3")
    with torch.no_grad():  # make "." the greedy choice after the first word: generation stops at extra_words
        (dot,) = llama3_encoding().encode_ordinary(".")
        head = model.lm_head.weight if not hasattr(model.lm_head, "base_layer") else model.lm_head.base_layer.weight
        head[dot] += 50 * model.causal_lm.model.norm.weight.sign()
    out = model.generate(num_sequences=2, config=GenerationConfig(extra_words=1, text_top_p=0.0))
    for b in range(2):
        toks = out.tokens[b][out.tokens[b] >= 0]
        assert tables.word_start[toks[0]]  # the first generated token is forced to start a word
        assert toks[-1] == dot and out.num_words[b] == 1 and (out.codes[b, 0] >= 0).all()
    # the hard limit: 3 x extra_words words when no sentence end comes
    model = make("latent", seed=3)
    out = model.generate(num_sequences=1, config=GenerationConfig(extra_words=2, text_top_p=0.0, max_new_tokens=400))
    assert out.num_words[0] <= 6
    assert ((out.codes[0] >= 0).all(-1).sum()) == out.num_words[0]
    # a text prompt (no codes) continues too
    tokens, word_ids, _, cu = prompt()
    out = model.generate(torch.cat(tokens), cu, torch.cat(word_ids), None, config=GREEDY)
    assert (out.num_words > 0).all()


def test_sampling_is_seeded_and_respects_the_ban():
    model = make("classifier", seed=2)
    cfg = GenerationConfig(extra_words=3, text_top_p=0.9, text_temperature=1.5, taste_top_p=0.9, max_new_tokens=16)
    a = model.generate(num_sequences=3, config=cfg, generator=torch.Generator().manual_seed(7))
    b = model.generate(num_sequences=3, config=cfg, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.codes, b.codes)
    kept = a.tokens[a.tokens >= 0]
    assert not sampler_tables("llama3").ban[kept].any()
    assert not torch.equal(a.tokens[0], a.tokens[1])


def test_compiled_step_matches_eager():
    model = make("latent", seed=2)
    tokens, word_ids, codes, cu = prompt()
    args = (torch.cat(tokens), cu, torch.cat(word_ids), torch.cat(codes))
    cfg = GenerationConfig(extra_words=2, text_top_p=0.0, max_new_tokens=8)
    a = model.generate(*args, config=cfg)
    b = model.generate(*args, config=cfg, compile=True)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.codes, b.codes)


def test_compiled_step_matches_eager_when_sampling():
    """Sampled text and sampled codes (the classifier head with top-p: the codes are drawn outside the compiled
    state machine, from the same generator) give the same sequences compiled and eager, for the same seed."""
    model = make("classifier", seed=2)
    tokens, word_ids, codes, cu = prompt()
    args = (torch.cat(tokens), cu, torch.cat(word_ids), torch.cat(codes))
    cfg = GenerationConfig(extra_words=2, text_top_p=0.9, text_temperature=1.5, taste_top_p=0.9, max_new_tokens=8)
    a = model.generate(*args, config=cfg, generator=torch.Generator().manual_seed(3))
    b = model.generate(*args, config=cfg, generator=torch.Generator().manual_seed(3), compile=True)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.codes, b.codes)


def test_compiled_state_machine_compiles_once_per_generation(monkeypatch):
    """The step's state machine is one compiled graph for every step of a generation: its per-step flags are
    tensors (no recompilation for the first and the last step, nor when the two flags would alias) and the prefill's
    last row is made contiguous like the steps' rows."""
    from torch._dynamo.testing import CompileCounter

    import taste.generate as generation

    counter = CompileCounter()
    monkeypatch.setattr(generation, "_compiled_advance", lambda: torch.compile(generation._advance, backend=counter))
    model = make("latent", seed=2)
    tokens, word_ids, codes, cu = prompt()
    # the shapes of test_compiled_step_matches_eager: torch 2.11's CPU inductor miscompiles (C++ error) the backbone
    # graph that a new cache length makes dynamic (the backbone's compile, not the state machine's)
    cfg = GenerationConfig(extra_words=2, text_top_p=0.0, max_new_tokens=8)
    out = model.generate(torch.cat(tokens), cu, torch.cat(word_ids), torch.cat(codes), config=cfg, compile=True)
    assert out.tokens.shape[1] >= 3 and counter.frame_count == 1, counter.frame_count


def test_bad_generation_input(model):
    with pytest.raises(ValueError, match="num_sequences"):
        model.generate(config=GREEDY)
    tokens, word_ids, codes, cu = prompt()
    t, w, c = torch.cat(tokens), torch.cat(word_ids), torch.cat(codes)
    with pytest.raises(ValueError, match="codes has 5 rows but the batch has 6 words"):
        model.generate(t, cu, w, c[:5], config=GREEDY)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
        model.generate(t, cu - 1, w, c, config=GREEDY)
    with pytest.raises(ValueError, match="tokens must be"):
        model.generate(t.int(), cu, w, c, config=GREEDY)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=\d+\), got ids in \[-1, "):
        model.generate(torch.where(t == t[0], -1, t), cu, w, c, config=GREEDY)
    with pytest.raises(ValueError, match="extra_words"):
        GenerationConfig(extra_words=0)
    with pytest.raises(ValueError, match="text_temperature"):
        GenerationConfig(text_temperature=0.0)
    for name in ("text_top_p", "taste_top_p"):  # before: 1.5 sampled as 1, -1 as greedy, silently
        with pytest.raises(ValueError, match=rf"{name} must be in \[0, 1\] \(0: greedy\), got -0.1"):
            GenerationConfig(**{name: -0.1})


def test_equals_the_official_algorithm(model):
    """The official per-step algorithm (bench/baselines.py: full re-run, Python state machine) picks the same
    tokens and codes as the batched cached generation, greedy, for every prompt of a batch."""
    from baselines import official_generate

    tokens, word_ids, codes, cu = prompt(seed=5)
    out = model.generate(torch.cat(tokens), cu, torch.cat(word_ids), torch.cat(codes), config=GREEDY)
    for i, (t, w, c) in enumerate(zip(tokens, word_ids, codes)):
        ref_tokens, ref_codes = official_generate(model, t, w, c, extra_words=3, max_new_tokens=24)
        assert torch.equal(out.tokens[i][out.tokens[i] >= 0], ref_tokens)
        assert torch.equal(out.codes[i, : int(out.num_words[i])], ref_codes)


# the Llama-3 chat template around a spoken question, as the official instruct mode is given it
PREFIX = (128000, 128006, 882, 128007, 271)  # <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n
SUFFIX = (128009, 128006, 78191, 128007, 271)  # <|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n


def instruct(**kw):
    return GenerationConfig(**{**GREEDY.__dict__, "instruct_prefix_ids": PREFIX, "instruct_suffix_ids": SUFFIX, **kw})


def test_instruct_mode_equals_the_official_algorithm(model):
    """The official instruct mode (plain prefix and suffix rows around the prompt's rows without BOS, the generated
    words afresh) and its stop rule: the same tokens and codes as bench/baselines.py's official algorithm, batched
    (left-padded prompts of different lengths) and cached."""
    from baselines import official_generate

    tokens, word_ids, codes, cu = prompt(seed=5)
    args = (torch.cat(tokens), cu, torch.cat(word_ids), torch.cat(codes))
    plain = model.generate(*args, config=GREEDY)
    out = model.generate(*args, config=instruct())
    assert not torch.equal(out.tokens, plain.tokens)  # (the prefix and suffix reach the model)
    full = model.generate(*args, config=instruct(), use_cache=False)
    assert torch.equal(out.tokens, full.tokens) and torch.equal(out.codes, full.codes)
    tables = sampler_tables("llama3")
    for i, (t, w, c) in enumerate(zip(tokens, word_ids, codes)):
        ref_tokens, ref_codes = official_generate(model, t, w, c, extra_words=3, max_new_tokens=24,
                                                  prefix_ids=PREFIX, suffix_ids=SUFFIX)  # fmt: skip
        mine = out.tokens[i][out.tokens[i] >= 0]
        assert torch.equal(mine, ref_tokens)
        assert torch.equal(out.codes[i, : int(out.num_words[i])], ref_codes)
        # stop at a word start that the unstopped run draws later: the text ends before it, the codes of every word
        later = [s for s in range(2, mine.numel()) if tables.word_start[mine[s]] and mine[s] not in mine[:s]]
        if not later:
            continue
        s = later[0]
        stopped = model.generate(t, torch.tensor([0, len(t)], dtype=torch.int32), w, c,
                                 config=instruct(stop_id=int(mine[s])))  # fmt: skip
        stop = int(mine[s])
        ref_tokens, ref_codes = official_generate(model, t, w, c, extra_words=3, max_new_tokens=24,
                                                  prefix_ids=PREFIX, suffix_ids=SUFFIX, stop_id=stop)  # fmt: skip
        assert torch.equal(stopped.tokens[0][stopped.tokens[0] >= 0], mine[:s]) and torch.equal(ref_tokens, mine[:s])
        n = int(stopped.num_words[0])
        assert n == int(tables.word_start[mine[:s]].sum()) + (not tables.word_start[mine[0]])
        assert torch.equal(stopped.codes[0, :n], ref_codes) and (ref_codes >= 0).all()


def test_stop_id_is_never_banned_and_ends_the_text_where_drawn():
    """A special token (banned otherwise) as stop_id: drawn where the head favours it, never output; the step that
    drew it predicts the last word's codes; the same tokens and codes as the official algorithm. Before, the stop
    token was output as a word of its own, with one more tail step."""
    from baselines import official_generate

    model = make("latent", seed=2)
    eot = 128009
    assert sampler_tables("llama3").ban[eot]
    with torch.no_grad():
        head = model.lm_head.weight if not hasattr(model.lm_head, "base_layer") else model.lm_head.base_layer.weight
        head[eot] += 0.3 * model.causal_lm.model.norm.weight.sign()
    tokens, word_ids, codes, cu = prompt(seed=5)
    args = (torch.cat(tokens), cu, torch.cat(word_ids), torch.cat(codes))
    free = model.generate(*args, config=GREEDY)
    assert not (free.tokens == eot).any()  # banned without stop_id
    out = model.generate(*args, config=GenerationConfig(**{**GREEDY.__dict__, "stop_id": eot}))
    lengths = (out.tokens >= 0).sum(1)
    assert lengths.tolist() == [0, 0, 2] and (free.tokens >= 0).sum(1).tolist() == [24, 24, 9]  # (stop at 0 and 2)
    for b, (t, w, c) in enumerate(zip(tokens, word_ids, codes)):
        mine = out.tokens[b][out.tokens[b] >= 0]
        assert torch.equal(mine, free.tokens[b][: lengths[b]])  # the same text up to the stop
        n = int(out.num_words[b])
        assert (out.codes[b, :n] >= 0).all() and (out.codes[b, n:] < 0).all()
        ref_tokens, ref_codes = official_generate(model, t, w, c, extra_words=3, max_new_tokens=24, stop_id=eot)
        assert torch.equal(mine, ref_tokens) and torch.equal(out.codes[b, :n], ref_codes)
    assert int(out.num_words[2]) == 2


def test_instruct_configuration_errors(model):
    with pytest.raises(ValueError, match="instruct_suffix_ids needs instruct_prefix_ids"):
        GenerationConfig(instruct_suffix_ids=(1, 2))
    with pytest.raises(ValueError, match=r"instruct_prefix_ids must be token ids \(ints >= 0\), got \[1, -2\]"):
        GenerationConfig(instruct_prefix_ids=[1, -2])
    with pytest.raises(TypeError, match="instruct_prefix_ids must be"):
        GenerationConfig(instruct_prefix_ids="128000")
    with pytest.raises(ValueError, match="stop_id must be a token id >= 0"):
        GenerationConfig(stop_id=-1)
    assert GenerationConfig(instruct_prefix_ids=[1, 2]).instruct_prefix_ids == (1, 2)  # (a JSON list)
    with pytest.raises(ValueError, match=r"instruct ids must lie in \[0, vocab_size=\d+\), got 999999"):
        model.generate(num_sequences=1, config=instruct(instruct_prefix_ids=(999999,)))
    with pytest.raises(ValueError, match=r"stop_id must lie in \[0, vocab_size=\d+\), got 999999"):
        model.generate(num_sequences=1, config=instruct(stop_id=999999))
    with pytest.raises(ValueError, match="instruct mode needs instruct_prefix_ids or instruct_suffix_ids"):
        model.generate(num_sequences=1, config=instruct(instruct_prefix_ids=(), instruct_suffix_ids=()))
    out = model.generate(num_sequences=2, config=instruct())  # an instruction alone: both sequences alike
    assert torch.equal(out.tokens[0], out.tokens[1]) and (out.num_words > 0).all()


def test_official_sampling_equals_the_official_algorithm(model):
    """official_sampling: the official sampler's ban (special tokens allowed: one is made likely here), no word-start
    mask on the first token, and the official text mode (plain rows without BOS): the same tokens and codes as
    bench/baselines.py's official algorithm with its own ban table, for speech and text prompts."""
    from baselines import official_generate, official_sampler_ban

    special = 128100  # <|reserved_special_token_92|>
    tables, official_ban = sampler_tables("llama3"), official_sampler_ban(128256)
    assert tables.ban[special] and not official_ban[special]
    eos = torch.arange(128256) == 128001
    assert torch.equal(tables.ban & ~tables.special | eos, official_ban)  # (the one difference of the two tables)
    assert tables.special.sum() == 256 and tables.special[128000:].all()
    torch.manual_seed(0)
    with torch.no_grad():
        head = model.lm_head.weight if not hasattr(model.lm_head, "base_layer") else model.lm_head.base_layer.weight
        kept = head[special].clone()
        head[special] += 0.25 * model.causal_lm.model.norm.weight.sign()
    try:
        tokens, word_ids, codes, cu = prompt(seed=5)
        official = GenerationConfig(**{**GREEDY.__dict__, "official_sampling": True})
        drawn = []
        for with_codes in (True, False):
            c_all = torch.cat(codes) if with_codes else None
            ours = model.generate(torch.cat(tokens), cu, torch.cat(word_ids), c_all, config=GREEDY)
            out = model.generate(torch.cat(tokens), cu, torch.cat(word_ids), c_all, config=official)
            assert not torch.equal(out.tokens, ours.tokens)  # (the official choices matter here)
            for i, (t, w, c) in enumerate(zip(tokens, word_ids, codes)):
                ref_tokens, ref_codes = official_generate(model, t, w, c if with_codes else None, extra_words=3,
                                                          max_new_tokens=24, official_sampling=True)  # fmt: skip
                mine = out.tokens[i][out.tokens[i] >= 0]
                assert torch.equal(mine, ref_tokens)
                assert torch.equal(out.codes[i, : int(out.num_words[i])], ref_codes)
                drawn.append(mine)
        drawn = torch.cat(drawn)
        assert (drawn == special).any() and not sampler_tables("llama3").word_start[drawn].all()
    finally:
        with torch.no_grad():
            head[special] = kept
    with pytest.raises(ValueError, match="official_sampling feeds a text prompt without BOS: every prompt needs"):
        model.generate(tokens[0], torch.tensor([0, 0, 5], dtype=torch.int32), word_ids[0], config=official)
