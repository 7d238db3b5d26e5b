import pytest
import torch

from taste.text import DualTokenizer, WordTokenizer, llama3_encoding, split_words, whisper_encoding

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
