import copy
import dataclasses

import pytest
import torch
from baselines import official_tokenizer_codes
from conftest import tiny_whisper_dir

import taste
from taste import ops
from taste.encoder import EncoderConfig
from taste.text import whisper_encoding

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world",
    "Antidisestablishmentarianism is a rather long word, isn't it?",
    "Short one here",
    "Seven golden ducks swam across the pond in a neat line.",
]


def small_config(**overrides):
    """tiny() with a 3 s window and two encoder layers, to keep the tests quick. Few codes per stage: with as many
    codes as words, k-means leaves later stages near-duplicate codewords, true ties that two correct
    implementations may break differently."""
    tiny = taste.TasteConfig.tiny()
    encoder = dataclasses.replace(tiny.encoder, window_seconds=3.0, num_layers=2, value_layer=1)
    quantizer = dataclasses.replace(tiny.quantizer, codebook_size=4, kmeans_iters=5)
    return dataclasses.replace(tiny, encoder=encoder, quantizer=quantizer, **overrides)


def speech(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(int(16000 * (0.8 + 0.4 * i)), generator=g) for i in range(n)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = taste.TasteTokenizer(config=small_config())
    with torch.no_grad():  # k-means-initialise the codebooks on one batch
        m.train()
        m.tokenize(*m.prepare(speech(), TEXTS))
    return m.eval()


def test_forward_is_the_composition_of_the_parts(model):
    mel, text = model.prepare(speech(), TEXTS)
    assert mel.shape == (5, 80, 300)
    with torch.no_grad():
        out = model.tokenize(mel, text)
        h_key, h_val = model.encoder(mel)
        a = text.asr
        per_token = model.aggregator(a.tokens, a.cu_seqlens, a.max_seqlen, h_key, h_val)
        words = ops.segment_mean(per_token, ops.word_offsets(a.word_ids, a.cu_seqlens))
        quantized, codes, _ = model.quantizer(words)
    n_words = [len(t.split()) for t in TEXTS]
    assert out.word_codes.shape == (sum(n_words), 4) and out.word_codes.dtype == torch.long
    assert out.word_cu_seqlens.tolist() == torch.tensor([0] + n_words).cumsum(0).tolist()
    assert out.word_cu_seqlens.dtype == torch.int32
    assert torch.equal(out.word_codes, codes)
    torch.testing.assert_close(out.word_embeddings, quantized)
    torch.testing.assert_close(model.embeddings_from_codes(out.word_codes), out.word_embeddings)
    # the lists a `taste encode` JSONL holds do too (before: "'list' object has no attribute 'dim'")
    torch.testing.assert_close(model.embeddings_from_codes(out.word_codes.tolist()), out.word_embeddings)
    assert len(set(out.word_codes[:, 0].tolist())) >= 3  # initialised codebooks: the codes say something
    # the same with host-side values left to forward (it reads them back itself)
    again = model(mel, a.tokens, a.cu_seqlens, a.word_ids)
    assert torch.equal(again.word_codes, out.word_codes)


def test_codes_match_the_official_style_pipeline(model):
    ours = model.encode(speech(), TEXTS)
    with torch.no_grad():
        ref = official_tokenizer_codes(model, speech(), TEXTS, whisper_encoding().encode_ordinary)
    for a, b, text in zip(ours, ref, TEXTS):
        assert a.shape == (len(text.split()), 4)
        assert torch.equal(a, b)


def test_batch_invariance(model):
    waves = speech()
    together = model.encode(waves, TEXTS)
    for i in range(len(TEXTS)):
        assert torch.equal(model.encode([waves[i]], [TEXTS[i]])[0], together[i])
    order = [3, 0, 4, 2, 1]
    shuffled = model.encode([waves[i] for i in order], [TEXTS[i] for i in order])
    for j, i in enumerate(order):
        assert torch.equal(shuffled[j], together[i])


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = taste.TasteTokenizer.from_pretrained(tmp_path)
    assert loaded.config == model.config
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert all(torch.equal(a, b) for a, b in zip(loaded.encode(speech(), TEXTS), model.encode(speech(), TEXTS)))
    with pytest.raises(FileNotFoundError, match=r"'.*missing' is not a directory \(expected a TasteTokenizer"):
        taste.TasteTokenizer.from_pretrained(tmp_path / "missing")  # (before: "has no config.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        taste.TasteTokenizer.from_pretrained(tmp_path / "empty")
    # another kind of model's directory, or a training run's: said so (before: KeyError 'aggregator', or
    # "UnitDecoderConfig.__init__() got an unexpected keyword argument")
    with pytest.raises(ValueError, match=r"holds a TasteTokenizer, not a UnitDecoder"):
        taste.UnitDecoder.from_pretrained(tmp_path)
    run = tmp_path / "run"
    model.save_pretrained(run / "final" / "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"save_pretrained directory \(one is in '.*run/final/tokenizer'\)"):
        taste.TasteTokenizer.from_pretrained(run)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # (a copy cut short: before, safetensors' message alone)
    with pytest.raises(ValueError, match=r"model.safetensors: cannot read its tensors, is the file whole\? \("):
        taste.TasteTokenizer.from_pretrained(tmp_path)


def test_compiled_aggregator_pooling_and_vq(model):
    mel, text = model.prepare(speech(), TEXTS)
    a = text.asr
    with torch.no_grad():
        h_key, h_val = model.encoder(mel)

        def words_and_codes(h_key, h_val, tokens, cu, offsets):
            words = model.embed_words(h_key, h_val, tokens, cu, a.max_seqlen, offsets)
            return words, model.quantizer(words)[1]

        eager = words_and_codes(h_key, h_val, a.tokens, a.cu_seqlens, a.word_offsets)
        compiled = torch.compile(words_and_codes, backend="aot_eager", fullgraph=True)
        got = compiled(h_key, h_val, a.tokens, a.cu_seqlens, a.word_offsets)
    torch.testing.assert_close(got[0], eager[0])
    assert torch.equal(got[1], eager[1])


def test_training_step_and_no_vq_stage():
    torch.manual_seed(1)
    model = taste.TasteTokenizer(config=small_config(freeze_encoder=True)).train()
    mel, text = model.prepare(speech(), TEXTS)
    out = model.tokenize(mel, text, quantize=False)
    assert bool((out.word_codes == -1).all()) and float(out.commit_loss) == 0.0
    out.word_embeddings.square().mean().backward()
    assert model.aggregator.layers[1].fc1.weight.grad is not None
    assert all(p.grad is None for p in model.encoder.parameters())
    model.zero_grad()
    out = model.tokenize(mel, text)
    (out.word_embeddings.square().mean() + out.commit_loss).backward()
    assert model.quantizer.project_in.weight.grad is not None
    assert model.aggregator.embed_tokens.weight.grad is not None
    assert bool(model.quantizer.initted.all())
    trainable = taste.TasteTokenizer(config=small_config(freeze_encoder=False)).train()
    trainable.tokenize(mel, text, quantize=False).word_embeddings.sum().backward()
    assert trainable.encoder.conv1.weight.grad is not None


def test_from_whisper_checkpoint(tmp_path):
    whisper = tiny_whisper_dir(tmp_path, encoder_layers=3, decoder_layers=2)
    model = taste.TasteTokenizer.from_whisper(str(tmp_path), value_layer=2).eval()
    assert model.config.encoder == EncoderConfig(
        n_mels=80, window_seconds=3.0, d_model=64, num_layers=3, num_heads=2, ffn_dim=96, value_layer=2
    )
    assert not any(p.requires_grad for p in model.encoder.parameters())
    layer = model.aggregator.layers[0].encoder_attn.v_proj  # the official seed: identity values
    assert torch.equal(layer.weight, torch.eye(64)) and not layer.bias.any()
    torch.testing.assert_close(model.aggregator.layers[1].fc1.weight, whisper.decoder.layers[1].fc1.weight)
    mel, _ = model.prepare(speech(2), TEXTS[:2])
    with torch.no_grad():
        ref = whisper.encoder(mel, output_hidden_states=True)
        h_key, h_val = model.encoder(mel)
    torch.testing.assert_close(h_key, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_val, ref.hidden_states[2], atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        taste.TasteTokenizer.from_whisper(str(tmp_path / "nope"))


def test_prefix_ids_follow_the_whisper_vocabulary(tmp_path):
    """large-v3 (51866 ids) and the earlier multilingual models (51865) number their task tokens differently: the
    seed model took large-v3's ids whatever the checkpoint, <|startoflm|> and the first timestamp in a 51865 one."""
    whisper_tokenizer = pytest.importorskip("whisper.tokenizer")
    for languages in (99, 100):
        ref = whisper_tokenizer.get_tokenizer(multilingual=True, num_languages=languages)
        want = (ref.sot, ref.encoding.encode_single_token("<|en|>"), ref.transcribe, ref.no_timestamps)
        assert taste.aggregator.whisper_prefix_ids(ref.encoding.n_vocab) == want
        for language in ("de", "haw", "la"):  # another language token in place of <|en|>
            want = (ref.sot, ref.encoding.encode_single_token(f"<|{language}|>"), ref.transcribe, ref.no_timestamps)
            assert taste.aggregator.whisper_prefix_ids(ref.encoding.n_vocab, language) == want
    assert taste.aggregator.whisper_prefix_ids(51866) == taste.aggregator.WHISPER_PREFIX_IDS
    with pytest.raises(ValueError, match=r"language must be one of this Whisper's 99 language codes .* got 'yue'"):
        taste.aggregator.whisper_prefix_ids(51865, "yue")  # (large-v3's hundredth)
    tiny_whisper_dir(tmp_path / "v2", vocab_size=51865)
    model = taste.TasteTokenizer.from_whisper(str(tmp_path / "v2"), value_layer=1)
    assert model.config.aggregator.prefix_ids == (50258, 50259, 50359, 50363)
    assert model.aggregator.prefix_ids.tolist() == [50258, 50259, 50359, 50363]
    german = taste.TasteTokenizer.from_whisper(str(tmp_path / "v2"), value_layer=1, language="de")
    assert german.config.aggregator.prefix_ids == (50258, 50261, 50359, 50363)
    tiny_whisper_dir(tmp_path / "en", vocab_size=51864)
    with pytest.raises(ValueError, match=r"English-only Whisper.* pass prefix_ids"):
        taste.TasteTokenizer.from_whisper(str(tmp_path / "en"), value_layer=1)


def test_a_whisper_seed_with_llama3_queries(tmp_path):
    """The official repository's PR #4: queries in the LLM's tokens. Each Llama-3 token's row starts as the mean of
    the Whisper rows that spell it, the prefix rows follow the vocabulary, and the model tokenizes, saves and
    loads like any other."""
    whisper = tiny_whisper_dir(tmp_path / "whisper")
    seed = taste.TasteTokenizer.from_whisper(str(tmp_path / "whisper"), value_layer=1).eval()
    model = taste.TasteTokenizer.from_whisper(str(tmp_path / "whisper"), value_layer=1, asr_tokenizer="llama3").eval()
    table, old = model.aggregator.embed_tokens.weight, whisper.decoder.embed_tokens.weight
    assert model.config.aggregator.vocab_size == table.shape[0] == 128256 + 4
    assert model.config.aggregator.prefix_ids == (128256, 128257, 128258, 128259)
    torch.testing.assert_close(table[128256:], old[list(taste.aggregator.WHISPER_PREFIX_IDS)], rtol=0, atol=0)
    whisper_ids = whisper_encoding().encode_ordinary(" Antidisestablishmentarianism")
    llama_ids = taste.text.llama3_encoding().encode_ordinary(" Antidisestablishmentarianism")
    assert len(whisper_ids) > 1 and len(llama_ids) > 1
    torch.testing.assert_close(table[1917], old[whisper_encoding().encode_ordinary(" world")[0]], rtol=0, atol=0)
    torch.testing.assert_close(table[15339], old[whisper_encoding().encode_ordinary("hello")].mean(0))
    assert torch.equal(table[128000], table[128255])  # special tokens: one shared row, the mean of spelled rows
    assert table.requires_grad and seed.aggregator.embed_tokens.weight.requires_grad  # (trained in stage 1)
    text = model.text_tokenizer(TEXTS[:2])
    want = [i for w in TEXTS[1].split() for i in taste.text.llama3_encoding().encode_ordinary(" " + w)]
    assert text.asr.tokens[text.asr.cu_seqlens[1] :].tolist() == want
    # Everything but the token embedding is the seed's: one word that both tokenizers make one token of (" world"
    # above) gets the same word embedding from both models.
    mel, _ = model.prepare(speech(1), ["world"])
    with torch.no_grad():
        a = model.tokenize(mel, model.text_tokenizer(["world"]), quantize=False).word_embeddings
        b = seed.tokenize(mel, seed.text_tokenizer(["world"]), quantize=False).word_embeddings
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    model.quantizer.quantize_dropout = False  # (k-means initialises every stage's codebook in one step)
    with torch.no_grad():
        model.train().tokenize(*model.prepare(speech(3), TEXTS[:3]))
    model.eval().save_pretrained(str(tmp_path / "saved"))
    loaded = taste.TasteTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert loaded.config == model.config
    codes = zip(loaded.encode(speech(2), TEXTS[:2]), model.encode(speech(2), TEXTS[:2]))
    assert all(torch.equal(x, y) for x, y in codes)


@pytest.mark.filterwarnings("ignore:taste. ResidualVQ stages")  # (random codebooks: codes of shape only)
def test_queries_of_another_tokenizer_need_its_vocabulary():
    """Llama-3 ids past a Whisper-sized embedding failed at the first batch holding one (an IndexError on the CPU,
    a device assert on CUDA); ids below it looked up unrelated Whisper rows without a word."""
    mismatched = taste.TasteTokenizer(config=small_config(asr_tokenizer="llama3"))
    with pytest.raises(ValueError, match=r"'llama3' tokenises words into ids up to 127999 but the aggregator embeds "
                                         r"51866 \(aggregator.vocab_size\)"):  # fmt: skip
        mismatched.encode(speech(1), ["hello"])
    config = small_config().with_asr_tokenizer("llama3")
    assert config.aggregator.vocab_size == 128260 and config.aggregator.prefix_ids == (128256, 128257, 128258, 128259)
    assert small_config().with_asr_tokenizer("whisper") == small_config()
    model = taste.TasteTokenizer(config=config)
    assert [c.shape for c in model.encode(speech(2), TEXTS[:2])] == [(9, 4), (2, 4)]


def test_init_tokenizer_with_llama3_queries(tmp_path, capsys):
    from taste import cli

    assert cli.main(["init-tokenizer", str(tmp_path / "seed"), "--preset", "tiny", "--asr-tokenizer", "llama3"]) == 0
    config = taste.TasteTokenizer.from_pretrained(str(tmp_path / "seed")).config
    assert config == taste.TasteConfig.tiny().with_asr_tokenizer("llama3") and config.asr_tokenizer == "llama3"
    tiny_whisper_dir(tmp_path / "whisper")
    argv = ["init-tokenizer", str(tmp_path / "seeded"), "--whisper", str(tmp_path / "whisper"), "--value-layer", "1"]
    assert cli.main(argv + ["--asr-tokenizer", "llama3"]) == 0
    config = taste.TasteTokenizer.from_pretrained(str(tmp_path / "seeded")).config
    assert config.aggregator.vocab_size == 128260 and config.asr_tokenizer == "llama3"


def test_bad_input(model):
    mel, text = model.prepare(speech(2), TEXTS[:2])
    a = text.asr
    with pytest.raises(ValueError, match="asr_cu_seqlens must have B \\+ 1 = 2 entries"):
        model(mel[:1], a.tokens, a.cu_seqlens, a.word_ids)
    with pytest.raises(ValueError, match=r"mel must be \(B, 80, \d+\), got \(80, \d+\)"):  # before: "B + 1 = 81"
        model(mel[0], a.tokens, a.cu_seqlens, a.word_ids)
    with pytest.raises(ValueError, match="asr_word_ids .* must match asr_tokens"):
        model(mel, a.tokens, a.cu_seqlens, a.word_ids[:-1])
    with pytest.raises(ValueError, match=r"codes must be \(W, 4\)"):
        model.embeddings_from_codes(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="got 2 waveforms but 1 texts"):
        model.encode(speech(2), TEXTS[:1])
    with pytest.raises(TypeError, match="texts must be a list of strings"):  # before: "1 waveforms but 11 texts"
        model.encode(speech(1), "hello world")
    with pytest.raises(ValueError, match="longer than the 3 s window"):
        model.encode([torch.zeros(16000 * 4)], ["too long"])
    with pytest.raises(ValueError, match="encoder.d_model .* must equal aggregator.d_model"):
        taste.TasteTokenizer(config=small_config(aggregator=taste.AggregatorConfig(d_model=64, num_heads=2)))
    other = taste.TextQueryAggregator(config=dataclasses.replace(small_config().aggregator, num_layers=1))
    with pytest.raises(ValueError, match="aggregator's config differs from config.aggregator"):
        taste.TasteTokenizer(config=small_config(), aggregator=other)


def test_a_tokenizer_cast_as_a_whole_still_tokenizes(model):
    """``to_precision`` keeps the quantizer in float32; ``.to(torch.bfloat16)`` or ``.double()`` on the whole model
    casts it too, which made its projections refuse the float32 words ("mat1 and mat2 must have the same dtype")."""
    mel, text = model.prepare(speech(), TEXTS)
    with torch.no_grad():
        want = model.tokenize(mel, text)
        wide = copy.deepcopy(model).double()
        got = wide.tokenize(mel.double(), text)
        assert got.word_embeddings.dtype == torch.float64 and torch.equal(got.word_codes, want.word_codes)
        narrow = copy.deepcopy(model).to(torch.bfloat16)
        got = narrow.tokenize(mel, text)
    assert narrow.quantizer.embed.dtype == torch.bfloat16 and got.word_embeddings.dtype == torch.bfloat16
    assert got.word_codes.shape == want.word_codes.shape and (got.word_codes >= 0).all()
