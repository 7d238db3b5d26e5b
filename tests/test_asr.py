"""Whisper ASR (taste.asr): greedy transcripts against transformers' Whisper generate, and the TASTE tokenizer
transcribing and encoding from one encoder pass."""

import functools
import json
import os
import shutil

import pytest
import torch
from conftest import DEVICES, espeak_manifest, save_whisper_for_asr, tiny_whisper_dir, whisper_config

import taste
from taste import cli, corpus
from taste.asr import TranscriberConfig, WhisperTranscriber, encoder_fingerprint, same_encoder, word_error_rate

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:taste. ResidualVQ stages")  # (seed models: codes of shape only)

MAX_NEW = 18
TIMESTAMPS = range(50365, 51866)


def asr_whisper_dir(path, *, seed=0, suppress=(1, 2, 7), frames=150):
    """A random transformers Whisper (width 64, 80 mels, a ``frames / 50`` s window) whose greedy transcripts
    depend on the speech (its weights are large) and end at different steps, saved with large-v3's generation
    rules (:func:`conftest.save_whisper_for_asr`); returns the model."""
    cfg = whisper_config(
        num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=96, decoder_ffn_dim=96, max_source_positions=frames,
        max_target_positions=40, init_std=0.4,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    return save_whisper_for_asr(model, path, suppress=suppress, max_new_tokens=MAX_NEW)


def hf_greedy(model, mel):
    """transformers' Whisper generate (English, transcribe, no timestamps): the new tokens, padded with EOS."""
    with torch.no_grad():
        return model.generate(mel, language="en", task="transcribe", return_timestamps=False)


def speech(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(int(16000 * (0.5 + 0.45 * i)), generator=g) for i in range(n)]


def padded(ids, width):
    return torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=50257)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    path = tmp_path_factory.mktemp("asr_whisper")
    model = asr_whisper_dir(path)
    return path, model


def test_greedy_ids_equal_transformers_generate(whisper):
    path, hf = whisper
    asr = WhisperTranscriber.from_whisper(str(path), encoder=True).eval()
    assert asr.config.suppress_ids == (1, 2, 7, *TIMESTAMPS) and asr.config.begin_suppress_ids == (220, 50257)
    assert asr.config.max_new_tokens == MAX_NEW and asr.config.eos_id == 50257
    mel = torch.randn(7, 80, 300, generator=torch.Generator().manual_seed(1))
    ref = padded(hf_greedy(hf, mel), MAX_NEW)
    states, _ = asr.encoder(mel)
    ids, lengths = asr.generate(states)
    assert torch.equal(ids, ref)
    assert torch.equal(lengths, (ref != 50257).sum(1))
    assert len(set(lengths.tolist())) >= 3 and MAX_NEW in lengths.tolist()  # ends at several steps, one never
    for check_every in (1, 3, 64):  # how often the host looks changes nothing
        assert torch.equal(asr.generate(states, check_every=check_every)[0], ids)
    for i in (0, 4):  # each row alone decodes as in the batch
        alone, n = asr.generate(states[i : i + 1])
        assert torch.equal(alone[0], ids[i]) and int(n) == int(lengths[i])
    short, n = asr.generate(states, max_new_tokens=5)
    assert torch.equal(short, ids[:, :5]) and torch.equal(n, lengths.clamp(max=5))
    empty, n = asr.generate(states[:0])
    assert empty.shape == (0, MAX_NEW) and n.shape == (0,)


def test_suppressed_tokens_are_never_drawn(tmp_path, whisper):
    """Ban what the model likes best: transformers and ours then agree on the second choices, and no banned id
    (nor a space or EOS first) comes out."""
    path, hf = whisper
    asr = WhisperTranscriber.from_whisper(str(path), encoder=True).eval()
    mel = torch.randn(5, 80, 300, generator=torch.Generator().manual_seed(2))
    ids, _ = asr.generate(asr.encoder(mel)[0])
    liked = sorted({int(t) for t in ids[:, :3].flatten()} - {50257})
    banned = asr_whisper_dir(tmp_path, suppress=liked)
    asr = WhisperTranscriber.from_whisper(str(tmp_path), encoder=True).eval()
    assert asr.config.suppress_ids == (*liked, *TIMESTAMPS)
    ids, lengths = asr.generate(asr.encoder(mel)[0])
    assert torch.equal(ids, padded(hf_greedy(banned, mel), MAX_NEW))
    assert not torch.isin(ids, torch.tensor(liked)).any()
    assert not torch.isin(ids[:, 0], torch.tensor([220, 50257])).any() and bool((lengths >= 1).all())


def test_transcribe_and_encode_shares_the_encoder_pass(whisper):
    """One encoder pass: the transcripts are transformers' from the same speech, and the codes are those of
    encode() given these transcripts."""
    path, hf = whisper
    tok = taste.TasteTokenizer.from_whisper(str(path), value_layer=1).eval()
    asr = WhisperTranscriber.from_whisper(str(path))
    assert asr.encoder is None and same_encoder(asr.encoder_fingerprint, encoder_fingerprint(
        tok.encoder.state_dict(), tok.config.encoder.num_layers))  # fmt: skip
    waves = speech(6)
    texts, codes = tok.transcribe_and_encode(waves, asr)
    assert tok.transcribe_and_encode(waves, asr, asr_batch_size=4)[0] == texts  # (decoded 4 at a time)
    mel, _ = tok.prepare(waves, ["x"] * len(waves))
    ref = padded(hf_greedy(hf, mel), MAX_NEW)
    assert texts == asr.decode(ref, (ref != 50257).sum(1))
    assert all(text.split() for text in texts) and len(set(texts)) > 1
    want = tok.encode(waves, texts)
    assert len(codes) == len(want) and all(torch.equal(a, b) for a, b in zip(codes, want))
    assert [c.shape[0] for c in codes] == [len(t.split()) for t in texts]
    own = WhisperTranscriber.from_whisper(str(path), encoder=True)
    assert own.transcribe(waves, batch_size=4) == texts  # its own encoder: the same states


def test_an_encoder_of_another_whisper_is_refused(tmp_path, whisper):
    path, _ = whisper
    asr = WhisperTranscriber.from_whisper(str(path))
    tiny_whisper_dir(tmp_path / "other", encoder_layers=2, decoder_layers=1)
    other = taste.TasteTokenizer.from_whisper(str(tmp_path / "other"), value_layer=1).eval()
    with pytest.raises(ValueError, match="another Whisper encoder than this model's"):
        other.transcribe_and_encode(speech(2), asr)
    texts, codes = other.transcribe_and_encode(speech(2), asr, check_encoder=False)  # told: it runs
    assert len(texts) == len(codes) == 2
    asr.encoder_fingerprint = None
    with pytest.raises(ValueError, match="no encoder_fingerprint"):
        other.transcribe_and_encode(speech(2), asr)
    with pytest.raises(TypeError, match="asr must be a taste.asr.WhisperTranscriber, got str"):
        other.transcribe_and_encode(speech(2), str(path))


def test_a_transcript_without_words_is_named(whisper, monkeypatch):
    path, _ = whisper
    tok = taste.TasteTokenizer.from_whisper(str(path), value_layer=1).eval()
    asr = WhisperTranscriber.from_whisper(str(path))
    monkeypatch.setattr(asr, "transcribe_states", lambda states, **kw: [" a b", "  "])
    with pytest.raises(ValueError, match=r"waveforms\[1\]: the ASR found no words in it \(transcript '  '\)"):
        tok.transcribe_and_encode(speech(2), asr)


def test_decode_skips_special_tokens_and_cleans_up_where_told(tmp_path, whisper):
    path, _ = whisper
    asr = WhisperTranscriber.from_whisper(str(path))
    enc = taste.text.whisper_encoding()
    words = enc.encode_ordinary(" Hello world") + enc.encode_ordinary(" .") + enc.encode_ordinary(" isn't it")
    row = torch.tensor([[50364, *words, 50365, 50257, 50257]])  # <|notimestamps|>, a timestamp, EOS
    assert asr.decode(row, torch.tensor([row.shape[1] - 2])) == [" Hello world . isn't it"]
    asr_whisper_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"clean_up_tokenization_spaces": True}))
    clean = WhisperTranscriber.from_whisper(str(tmp_path))
    assert clean.config.clean_up_spaces
    assert clean.decode(row, torch.tensor([row.shape[1] - 2])) == [" Hello world. isn't it"]


def test_checkpoint_layouts(tmp_path, whisper):
    """A sharded checkpoint, and a WhisperModel's (keys without ``model.``), load the same weights; without its
    encoder, only the decoder's tensors and the fingerprint's are read."""
    path, hf = whisper
    want = WhisperTranscriber.from_whisper(str(path), encoder=True)
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="300KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    hf.model.save_pretrained(str(tmp_path / "bare"))  # transformers' WhisperModel: encoder.*, decoder.*
    for layout in ("sharded", "bare"):
        got = WhisperTranscriber.from_whisper(str(tmp_path / layout), encoder=True)
        assert got.state_dict().keys() == want.state_dict().keys()
        assert all(torch.equal(got.state_dict()[k], v) for k, v in want.state_dict().items())
        assert got.encoder_fingerprint == want.encoder_fingerprint
    read = []
    real = taste.official.read_tensors

    def reading(file, select=None):
        tensors = real(file, select)
        read.extend(tensors)
        return tensors

    with pytest.MonkeyPatch.context() as m:
        m.setattr(taste.official, "read_tensors", reading)
        decoder_only = WhisperTranscriber.from_whisper(str(path))
    assert decoder_only.encoder is None and decoder_only.encoder_fingerprint == want.encoder_fingerprint
    assert sorted(k for k in read if k.startswith("model.encoder.")) == [
        "model.encoder.conv1.weight",
        "model.encoder.layer_norm.weight",
        "model.encoder.layers.1.fc2.weight",
    ]
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 5}))
    with pytest.raises(
        ValueError, match=r"config.json lacks \['d_model', .* not a Whisper config \(model_type 'llama'\)"
    ):
        WhisperTranscriber.from_whisper(str(tmp_path / "llama"))


def test_the_transcript_bound_follows_transformers(tmp_path, whisper):
    """max_new_tokens, else max_length less the prompt (as transformers 4.51, the official code's, counts it),
    else transformers' default max_length (20) less the prompt; within max_positions less the prompt."""
    path, _ = whisper
    shutil.copytree(path, tmp_path / "w")
    rules = json.loads((tmp_path / "w" / "generation_config.json").read_text())
    cases = (({}, MAX_NEW), ({"max_new_tokens": 7}, 7), ({"max_new_tokens": None, "max_length": 12}, 8),
             ({"max_new_tokens": None}, 16), ({"max_new_tokens": None, "max_length": 1000}, 36))  # fmt: skip
    for change, want in cases:
        changed = {k: v for k, v in {**rules, **change}.items() if v is not None}
        (tmp_path / "w" / "generation_config.json").write_text(json.dumps(changed))
        assert WhisperTranscriber.from_whisper(str(tmp_path / "w")).config.max_new_tokens == want


def test_config_and_argument_errors(tmp_path, whisper):
    path, _ = whisper
    with pytest.raises(ValueError, match=r"suppress_ids must not hold eos_id \(50257\)"):
        TranscriberConfig(suppress_ids=(50257,))
    with pytest.raises(ValueError, match=r"prompt_ids must be ids in \[0, vocab_size=51866\)"):
        TranscriberConfig(prompt_ids=(51866,))
    with pytest.raises(ValueError, match=r"max_new_tokens must be in \[1, 444\]"):
        TranscriberConfig(max_new_tokens=445)
    with pytest.raises(TypeError, match="num_layers must be <class 'int'>|num_layers must be int"):
        TranscriberConfig(num_layers="2")
    asr = WhisperTranscriber.from_whisper(str(path))
    with pytest.raises(ValueError, match=r"states must be \(B, E, 64\) encoder states, got \(2, 150\)"):
        asr.generate(torch.zeros(2, 150))
    with pytest.raises(ValueError, match=r"max_new_tokens must be <= 36 \(max_positions=40 less the 4 prompt"):
        asr.generate(torch.zeros(1, 150, 64), max_new_tokens=37)
    with pytest.raises(ValueError, match="check_every must be a positive int"):
        asr.generate(torch.zeros(1, 150, 64), check_every=0)
    with pytest.raises(ValueError, match="holds no encoder: load it with from_whisper"):
        asr.transcribe(speech(1))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        WhisperTranscriber.from_whisper(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json: not a transformers Whisper checkpoint"):
        WhisperTranscriber.from_whisper(str(tmp_path / "empty"))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_step_decodes_the_same(whisper, device):
    """One decoding step has the same shapes at every position: compiled whole (on CUDA as CUDA graphs), it gives
    the eager ids, again for other speech in the cache it keeps, and for another batch size."""
    path, _ = whisper
    asr = WhisperTranscriber.from_whisper(str(path), encoder=True, device=device).eval()
    mel = torch.randn(5, 80, 300, generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        states, _ = asr.encoder(mel)
    torch._dynamo.reset()
    for rows in (slice(0, 3), slice(2, 5), slice(0, 2)):  # the second reuses the kept cache: other states in it
        want = asr.generate(states[rows])
        got = asr.generate(states[rows], compile=True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert asr._kept is not None and asr._kept[1].cross_k[0].shape[0] == 2
    asr.release_cache()
    assert asr._kept is None


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_on_each_device(whisper, device):
    """bfloat16 weights (float16 on CUDA, as the official pipeline): the first step's logits are float32's within
    the precision, and the TASTE encoder's states give the transcripts the transcriber's own encoder gives."""
    path, _ = whisper
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    ref = WhisperTranscriber.from_whisper(str(path), encoder=True).eval()
    asr = WhisperTranscriber.from_whisper(str(path), encoder=True, dtype=dtype, device=device).eval()
    assert asr.embed_tokens.weight.dtype == dtype and asr.frontend.filters.dtype == torch.float32
    waves = speech(4)

    def first_logits(model):
        audio, _ = taste.audio.batch_waveforms(waves, 16000, window_seconds=3.0)
        with torch.no_grad():
            cache = model.new_cache(model.encoder(model.frontend(audio.to(device)))[0], 4)
            position = torch.zeros((), dtype=torch.long, device=device)
            for t in range(3):
                model(model.prompt_ids[t].expand(4), position, cache)
                position += 1
            return model(model.prompt_ids[3].expand(4), position, cache, model.first_logit_bias).cpu()

    want, got = first_logits(ref), first_logits(asr)
    assert got.dtype == torch.float32 and torch.equal(got.isinf(), want.isinf())
    finite = ~want.isinf()
    scale = float(want[finite].abs().max())
    torch.testing.assert_close(got[finite], want[finite], rtol=0, atol=0.05 * scale)
    texts = asr.transcribe(waves)
    tok = taste.TasteTokenizer.from_whisper(str(path), value_layer=1, dtype=dtype).to(device).eval()
    shared, codes = tok.transcribe_and_encode(waves, asr)
    assert shared == texts and [c.shape[0] for c in codes] == [len(t.split()) for t in texts]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return espeak_manifest(tmp_path_factory, num=7, seed=5)


def test_transcribe_and_encode_commands(manifest, tmp_path, monkeypatch, capsys):
    """`taste transcribe` fills a manifest's text (keeping the old one as reference_text); `taste encode --asr`
    needs no text, and gives the codes that `taste encode` gives on the transcribed manifest, resuming an
    interrupted run with its transcripts."""
    whisper, model = tmp_path / "whisper", tmp_path / "model"
    asr_whisper_dir(whisper, frames=1500)  # (a 30 s window: espeak utterances are longer than 3 s)
    assert cli.main(["init-tokenizer", str(model), "--whisper", str(whisper), "--value-layer", "1"]) == 0
    heard = tmp_path / "sub" / "heard.jsonl"
    heard.parent.mkdir()
    assert cli.main(["transcribe", str(manifest), "--whisper", str(whisper), "-o", str(heard), "--batch-size", "3",
                     "--quiet", "--json", str(tmp_path / "wer.json")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "transcribed 7 utterances" in printed
    rows, src = corpus.read_manifest(str(heard)), corpus.read_manifest(str(manifest))
    asr = WhisperTranscriber.from_whisper(str(whisper), encoder=True)
    waves = [corpus.read_wav(r["audio_path"])[0] for r in src]
    want = [t.strip() for t in asr.transcribe(waves)]
    assert [r["text"] for r in rows] == want and all(want)
    assert [r["reference_text"] for r in rows] == [r["text"] for r in src]
    same_file = [os.path.samefile(r["audio_path"], s["audio_path"]) for r, s in zip(rows, src)]
    assert all(same_file) and not rows[0]["path"].startswith("/")  # (made relative to heard/)
    assert rows[0]["voice"] == src[0]["voice"]
    wer = word_error_rate([r["text"] for r in src], want)  # (a random Whisper: every word wrong, or near)
    assert f"WER against the manifest's text (7 utterances, Whisper's English normalizer): {100 * wer['wer']:.2f}%" \
        in printed  # fmt: skip
    assert wer["wer"] > 0.9 and json.loads((tmp_path / "wer.json").read_text()) == wer

    bare = tmp_path / "bare.jsonl"  # no text at all
    bare.write_text("".join(json.dumps({"id": r["id"], "path": r["audio_path"]}) + "\n" for r in src))

    def encode(manifest_path, out, *extra):
        return cli.main(["encode", str(manifest_path), "--model", str(model), "-o", str(out), "--batch-size", "3",
                         "--quiet", *extra])  # fmt: skip

    assert encode(heard, tmp_path / "given.jsonl") == 0
    assert encode(bare, tmp_path / "asr.jsonl", "--asr", str(whisper)) == 0
    given = [json.loads(line) for line in open(tmp_path / "given.jsonl")]
    got = [json.loads(line) for line in open(tmp_path / "asr.jsonl")]
    assert [g["text"] for g in got] == want
    assert [{k: v for k, v in g.items() if k != "text"} for g in got] == given
    assert encode(bare, tmp_path / "fails.jsonl") == 1  # without --asr, rows need their text
    assert "manifest row has no 'text' field" in capsys.readouterr().err

    real, calls = taste.TasteTokenizer.transcribe_and_encode, []

    def crash_on_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(self, *args, **kwargs)

    out = tmp_path / "resumed.jsonl"
    monkeypatch.setattr(taste.TasteTokenizer, "transcribe_and_encode", crash_on_second_batch)
    assert encode(bare, out, "--asr", str(whisper)) == 1
    monkeypatch.undo()
    journal = [json.loads(line) for line in open(str(out) + ".partial")]
    assert journal[0]["asr"] == str(whisper) and all("text" in r for r in journal[1:]) and len(journal) == 4
    assert encode(bare, out, "--asr", str(whisper)) == 0
    assert "3 resumed from the journal" in capsys.readouterr().out
    assert out.read_text() == (tmp_path / "asr.jsonl").read_text()
    assert encode(bare, out, "--asr", str(tmp_path / "nope")) == 1
    assert "is not a directory (a local Whisper checkpoint)" in capsys.readouterr().err


def test_word_error_rate():
    wer = word_error_rate(["a b c d", "e f"], ["a x c d y", "e f"], normalize=False)
    assert wer == {"wer": 2 / 6, "substitutions": 1, "deletions": 0, "insertions": 1, "reference_words": 6,
                   "utterances": 2}  # fmt: skip
    assert word_error_rate(["a b c"], [""], normalize=False)["deletions"] == 3
    assert word_error_rate([""], ["a b"], normalize=False)["wer"] == float("inf")
    assert word_error_rate([""], [" "], normalize=False)["wer"] == 0.0
    # Whisper's English normalizer: case, punctuation, numbers and currency in one form
    assert word_error_rate(["Hello, world! It is five dollars."], ["hello world it is $5"])["wer"] == 0.0
    assert word_error_rate(["Hello, world!"], ["hello world"], normalize=False)["substitutions"] == 2
    with pytest.raises(ValueError, match="must pair up, got 2 and 1"):
        word_error_rate(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="not a str"):
        word_error_rate("a b", "a b")

    @functools.cache
    def distance(r, h):  # an independent Levenshtein distance over words
        if not r or not h:
            return len(r) + len(h)
        return min(distance(r[1:], h[1:]) + (r[0] != h[0]), distance(r[1:], h) + 1, distance(r, h[1:]) + 1)

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        r = tuple(torch.randint(0, 4, (int(torch.randint(0, 7, (1,), generator=g)),), generator=g).tolist())
        h = tuple(torch.randint(0, 4, (int(torch.randint(0, 7, (1,), generator=g)),), generator=g).tolist())
        counts = word_error_rate([" ".join(map(str, r))], [" ".join(map(str, h))], normalize=False)
        s, d, i = counts["substitutions"], counts["deletions"], counts["insertions"]
        assert s + d + i == distance(r, h) and len(h) == len(r) - d + i
