import pytest
import torch

from taste.text import (
    DualTokenizer,
    WordTokenizer,
    _bpe,
    bpe_ranks,
    llama3_encoding,
    split_words,
    token_bytes,
    token_pieces,
    whisper_encoding,
)

SENTENCE = "Hello world, this is TASTE's   text-aligned tokenizer: 42 words & more!"


def test_whisper_matches_openai_whisper():
    whisper_tokenizer = pytest.importorskip("whisper.tokenizer")
    ref = whisper_tokenizer.get_tokenizer(multilingual=True, num_languages=100)
    ours = whisper_encoding()
    assert ours.n_vocab == ref.encoding.n_vocab == 51866
    assert ours._special_tokens == ref.encoding._special_tokens
    assert (ref.sot, ref.eot, ref.transcribe, ref.no_timestamps) == (50258, 50257, 50360, 50364)
    assert ours.encode_single_token("<|en|>") == 50259
    for word in SENTENCE.split():
        assert ours.encode_ordinary(" " + word) == ref.encode(" " + word)


def test_llama3_matches_llama_models():
    assert llama3_encoding().encode_ordinary(" Hello world") == [22691, 1917]
    assert llama3_encoding().n_vocab == 128256
    assert llama3_encoding().encode_single_token("<|begin_of_text|>") == 128000
    assert llama3_encoding().encode_single_token("<|end_of_text|>") == 128001
    lm = pytest.importorskip("llama_models.llama3.tokenizer")
    ref = lm.Tokenizer.get_instance()
    assert llama3_encoding()._special_tokens == ref.model._special_tokens
    assert llama3_encoding().encode_ordinary(SENTENCE) == ref.encode(SENTENCE, bos=False, eos=False)


def test_split_words_collapses_whitespace():
    assert split_words("  a  b\tc\n d ") == ["a", "b", "c", "d"]


def test_dual_tokenization_is_packed_and_word_aligned():
    tok = DualTokenizer("whisper", "llama3")
    texts = ["Hello world", SENTENCE, "Antidisestablishmentarianism"]
    batch = tok(texts)
    whisper, llama = whisper_encoding(), llama3_encoding()
    for side, enc in ((batch.asr, whisper), (batch.llm, llama)):
        cu = side.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == side.tokens.numel() and side.max_seqlen == max(torch.tensor(cu).diff())
        for b, text in enumerate(texts):
            words = text.split()
            # every word, the first one included, is tokenised on its own with one leading space
            expected = [i for w in words for i in enc.encode_ordinary(" " + w)]
            expected_wids = [k for k, w in enumerate(words) for _ in enc.encode_ordinary(" " + w)]
            assert side.tokens[cu[b] : cu[b + 1]].tolist() == expected
            assert side.word_ids[cu[b] : cu[b + 1]].tolist() == expected_wids
        assert side.tokens.dtype == torch.long and side.word_ids.dtype == torch.int32
        # word_offsets: global word w owns rows [off[w], off[w+1])
        from taste import ops

        assert torch.equal(side.word_offsets, ops.word_offsets(side.word_ids, side.cu_seqlens))
    assert batch.word_cu_seqlens.tolist() == [0, 2, 2 + len(SENTENCE.split()), 3 + len(SENTENCE.split())]
    assert batch.asr.tokens[:2].tolist() == whisper.encode_ordinary(" Hello world")
    assert batch.llm.tokens[:2].tolist() == [22691, 1917]


def test_asr_only_and_cache_reuse():
    tok = DualTokenizer("whisper", None)
    a = tok(["the cat and the dog"])
    assert a.llm is None and a.asr.tokens.numel() == 5
    assert len(tok.asr._cache) == 4


def test_hugging_face_tokenizer_directory(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "wide": 3}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]")
    fast.save_pretrained(tmp_path)
    tok = DualTokenizer(str(tmp_path), str(tmp_path))
    batch = tok(["hello wide world", "world unknownword"])
    assert batch.asr.tokens.tolist() == [1, 3, 2, 2, 0]
    assert batch.llm.word_ids.tolist() == [0, 1, 2, 0, 1]


def test_token_pieces_spell_every_llama3_token_in_whisper_ids():
    """What a Whisper-seeded aggregator's embedding for Llama-3 queries is built from (remap_vocabulary)."""
    pieces, data = token_pieces("llama3", "whisper"), token_bytes("llama3")
    whisper = whisper_encoding()
    spelled = {i: b for b, i in bpe_ranks("whisper").items()}
    assert len(pieces) == len(data) == 128256 and all(p == () for p in pieces[128000:])  # the special tokens
    assert all(b"".join(spelled[i] for i in p) == data[t] for t, p in enumerate(pieces[:128000]))
    assert pieces[1917] == tuple(whisper.encode_ordinary(" world")) == (1002,)
    # Where a token is text, the pieces are Whisper's own tokens of it, but for the few that Whisper's
    # pre-tokeniser splits where BPE alone does not (tokens of several runs of spaces or digits, ...).
    same = total = 0
    for t in range(0, 128000, 5):
        try:
            text = data[t].decode()
        except UnicodeDecodeError:  # (a token holding part of a character: BPE of its bytes all the same)
            continue
        total += 1
        same += list(pieces[t]) == whisper.encode_ordinary(text)
    assert total > 20000 and same >= total - 10, (same, total)
    word = " Antidisestablishmentarianism"
    assert _bpe(word.encode(), bpe_ranks("whisper")) == whisper.encode_ordinary(word)


def test_token_bytes_of_hugging_face_vocabularies(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    # byte-level BPE (GPT-2, Llama 3, Qwen): tokens are written with printable stand-ins for their bytes
    texts = [SENTENCE, "naïve café 東京 tokyo", "hello\nworld"]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts * 4, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>")
    fast.add_tokens(["東京駅"])  # (a token added as plain text, not in the byte alphabet)
    fast.save_pretrained(tmp_path / "byte_level")
    data = token_bytes(str(tmp_path / "byte_level"))
    assert len(data) == len(fast) and data[fast.convert_tokens_to_ids("<s>")] is None
    assert data[fast.convert_tokens_to_ids("東京駅")] == "東京駅".encode()
    for text in texts:  # (東京's tokens hold parts of characters)
        ids = fast.encode(" " + text, add_special_tokens=False)
        assert b"".join(data[i] for i in ids) == (" " + text).encode()
    # SentencePiece: "\u2581" stands for a space, <0xNN> for a byte
    vocab = {"<unk>": 0, "\u2581hello": 1, "\u2581wor": 2, "ld": 3, "<0x0A>": 4, "<0xE6>": 5}
    piece = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>")),
        unk_token="<unk>",
    )
    piece.save_pretrained(tmp_path / "sentencepiece")
    assert token_bytes(str(tmp_path / "sentencepiece")) == [None, b" hello", b" wor", b"ld", b"\n", b"\xe6"]
    pieces = token_pieces(str(tmp_path / "sentencepiece"))
    whisper = whisper_encoding()
    assert pieces[:3] == [(), tuple(whisper.encode_ordinary(" hello")), tuple(whisper.encode_ordinary(" wor"))]
    with pytest.raises(ValueError, match="local Hugging Face tokenizer directory"):
        token_bytes(str(tmp_path / "none"))
    with pytest.raises(ValueError, match="name must be one of"):
        bpe_ranks("gpt2")


def test_bad_input():
    tok = DualTokenizer("whisper", None, max_asr_tokens=5)
    with pytest.raises(ValueError, match=r"texts\[1\] has no words"):
        tok(["fine", "   "])
    with pytest.raises(TypeError, match="list of strings"):
        tok("just one string")
    with pytest.raises(TypeError, match=r"texts\[0\] must be a str"):
        tok([3])
    with pytest.raises(ValueError, match=r"texts\[0\] has 6 ASR tokens, more than max_asr_tokens=5"):
        tok(["one two three four five six"])
    with pytest.raises(ValueError, match="local Hugging Face tokenizer directory"):
        WordTokenizer("/no/such/tokenizer")
