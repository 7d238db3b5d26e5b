"""Speech through TASTE and back (`taste.reconstruct`, `taste reconstruct`) on tiny random models: each utterance of a
batch gets what the stages give it alone, the ASR path equals the text path given the ASR's transcripts, and an
interrupted manifest run resumes to the files of an uninterrupted one."""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_stage1

from taste.cli import main
from taste.corpus import read_manifest, read_wav, unit_features, write_wav
from taste.reconstruct import reconstruct
from taste.train import Stage1Model
from taste.voice import VoiceGenerator, VoiceGeneratorConfig

CAMPPLUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "campplus_tiny.onnx")
TEXTS = ["hello there", "the quick brown fox jumps", "a", "over the lazy dog", "this is taste"]


def stage1_model(spk_dim: int = 192) -> Stage1Model:
    return tiny_stage1(spk_dim=spk_dim).eval()


def voice_generator(spk_dim: int = 192) -> VoiceGenerator:
    torch.manual_seed(1)
    return VoiceGenerator(config=VoiceGeneratorConfig.tiny(num_units=16, spk_dim=spk_dim)).eval()


def speech(lengths, seed: int = 1) -> list[torch.Tensor]:
    """Noisy harmonic tones of the given lengths (16 kHz): different audio, so different codes per utterance."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, n in enumerate(lengths):
        t = torch.arange(n) / 16000
        out.append(0.3 * torch.sin(2 * torch.pi * (150 + 40 * k) * t) + 0.05 * torch.randn(n, generator=g))
    return out


def lone_units(model: Stage1Model, wave, text: str, speaker, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """One utterance by the stages' own calls: ``(codes, units)``."""
    tok = model.tokenizer
    codes = tok.encode([wave], [text])[0]
    a = tok.text_tokenizer([text]).asr
    units = model.decoder.generate(a.tokens, a.cu_seqlens, a.max_seqlen, taste=tok.embeddings_from_codes(codes),
                                   word_offsets=a.word_offsets, speaker=speaker[None], **kwargs)[0]  # fmt: skip
    return codes, units


def patch_calls(monkeypatch, module, name: str, stop_at: int | None = None) -> list:
    """Counts the calls of ``module.name`` (the list returned grows by one per call) and, with ``stop_at``, raises
    KeyboardInterrupt at that call, as a run stopped there (in its ``stop_at``-th batch)."""
    real, calls = getattr(module, name), []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_batch_gives_each_utterance_what_it_gives_alone():
    model, voice = stage1_model(), voice_generator()
    waves = speech([9000, 16000, 12345])
    speaker = F.normalize(torch.randn(3, 192, generator=torch.Generator().manual_seed(2)), dim=1)
    out = reconstruct(model, waves, TEXTS[:3], voice=voice, speaker=speaker, greedy=True, seed=3)
    assert out.texts == TEXTS[:3] and out.sample_rate == 22050
    for i in range(3):
        codes, units = lone_units(model, waves[i], TEXTS[i], speaker[i], greedy=True)
        assert torch.equal(out.codes[i], codes) and codes.shape == (len(TEXTS[i].split()), 4)
        assert torch.equal(out.units[i], units)
    assert not torch.equal(out.codes[0], out.codes[1][:2])  # (the audio matters)
    want = voice.generate(out.units, speaker, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(w, v) for w, v in zip(out.waves, want))
    # sampled units: a seed repeats, another seed draws others; rates per waveform are taken
    a = reconstruct(model, waves, TEXTS[:3], voice=voice, speaker=speaker, seed=5)
    b = reconstruct(model, waves, TEXTS[:3], voice=voice, speaker=speaker, seed=5)
    c = reconstruct(model, waves, TEXTS[:3], voice=voice, speaker=speaker, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.units, b.units))
    assert any(x.numel() != y.numel() or not torch.equal(x, y) for x, y in zip(a.units, c.units))
    from taste.audio import resample

    slow = [resample(w, 16000, 8000) for w in waves]
    halved = reconstruct(model, slow, TEXTS[:3], sample_rate=[8000] * 3, voice=voice, speaker=speaker[0], greedy=True)
    lone = lone_units(model, resample(slow[1], 8000, 16000), TEXTS[1], speaker[0], greedy=True)[1]
    assert len(halved.units) == 3 and torch.equal(halved.units[1], lone)  # (one vector for all, 8 kHz audio)
    capped = reconstruct(model, waves, TEXTS[:3], voice=voice, speaker=speaker, greedy=True, max_new_tokens=7)
    assert [u.tolist() for u in capped.units] == [u[:7].tolist() for u in out.units]


def test_the_asr_path_equals_the_text_path_with_its_transcripts(tmp_path):
    from conftest import whisper_around

    from taste.asr import WhisperTranscriber

    model, voice = stage1_model(), voice_generator()
    whisper_around(model.tokenizer.encoder, tmp_path / "whisper", max_new_tokens=4)
    asr = WhisperTranscriber.from_whisper(str(tmp_path / "whisper"))
    waves = speech([16000, 11000])
    speaker = torch.ones(192) / 192**0.5
    heard = WhisperTranscriber.from_whisper(str(tmp_path / "whisper"), encoder=True).transcribe(waves)
    assert all(text.split() for text in heard)
    got = reconstruct(model, waves, asr=asr, voice=voice, speaker=speaker, greedy=True)
    want = reconstruct(model, waves, heard, voice=voice, speaker=speaker, greedy=True)
    assert got.texts == heard
    for name in ("codes", "units", "waves"):
        assert all(torch.equal(x, y) for x, y in zip(getattr(got, name), getattr(want, name))), name


def test_griffin_lim_stages_and_the_default_speaker():
    """k-means-unit models (80-value speaker inputs): the mean unit features of each utterance by default, and the
    no_vq and text stages read the pooled embeddings or no TASTE rows."""
    model = stage1_model(spk_dim=80)
    centroids = torch.randn(16, 80) * 0.3
    waves = speech([8000, 13000])
    tok = model.tokenizer
    for stage in ("vq", "no_vq", "text"):
        out = reconstruct(model, waves, TEXTS[:2], centroids=centroids, stage=stage, greedy=True)
        assert out.sample_rate == 16000 and all(w.numel() == 320 * u.numel() for w, u in zip(out.waves, out.units))
        for i in range(2):
            a = tok.text_tokenizer([TEXTS[i]]).asr
            mel, text = tok.prepare([waves[i]], [TEXTS[i]])
            pooled = tok.tokenize(mel, text, quantize=False)
            taste = {"vq": tok.embeddings_from_codes(out.codes[i]), "no_vq": pooled.word_embeddings, "text": None}
            units = model.decoder.generate(a.tokens, a.cu_seqlens, a.max_seqlen, taste=taste[stage],
                                           word_offsets=a.word_offsets, speaker=unit_features(waves[i]).mean(0)[None],
                                           greedy=True)[0]  # fmt: skip
            assert torch.equal(out.units[i], units), (stage, i)
        if stage != "vq":
            assert all(bool((c == -1).all()) for c in out.codes)


def test_bad_input_is_named():
    model, voice = stage1_model(), voice_generator()
    waves, spk = speech([8000]), torch.zeros(192)
    with pytest.raises(ValueError, match="give either centroids .* or voice"):
        reconstruct(model, waves, ["hi"], speaker=spk)
    with pytest.raises(ValueError, match="give either centroids .* or voice"):
        reconstruct(model, waves, ["hi"], voice=voice, centroids=torch.zeros(16, 80), speaker=spk)
    with pytest.raises(ValueError, match="give texts .* or asr"):
        reconstruct(model, waves, voice=voice, speaker=spk)
    with pytest.raises(ValueError, match="stage must be one of"):
        reconstruct(model, waves, ["hi"], voice=voice, speaker=spk, stage="asr")
    with pytest.raises(ValueError, match=r"speaker must be \(1, 192\)"):
        reconstruct(model, waves, ["hi"], voice=voice, speaker=torch.zeros(80))
    with pytest.raises(ValueError, match=r"takes \(192,\) speaker vectors .* give speaker"):
        reconstruct(model, waves, ["hi"], voice=voice)  # (a CAM++ decoder has no stand-in vector)
    with pytest.raises(ValueError, match="the voice generator reads 32 units, the unit decoder writes 16"):
        reconstruct(model, waves, ["hi"], voice=VoiceGenerator(config=VoiceGeneratorConfig.tiny(num_units=32)))
    with pytest.raises(ValueError, match=r"texts\[0\]"):  # (the tokenizer names the empty transcript)
        reconstruct(model, waves, [""], voice=voice, speaker=spk)
    with pytest.warns(UserWarning, match="the voice generator gets zeros"):
        out = reconstruct(model, waves, ["hi"], voice=voice_generator(spk_dim=8), speaker=spk, greedy=True)
    assert out.waves[0].numel() > 0
    assert reconstruct(model, [], [], voice=voice).waves == []


@pytest.fixture
def release(tmp_path):
    """A tiny model in `taste import-official`'s layout with the CAM++ file beside it, a voice generator, and a
    manifest of 5 utterances of different lengths."""
    model = stage1_model()
    model.tokenizer.save_pretrained(str(tmp_path / "official" / "tokenizer"))
    model.decoder.save_pretrained(str(tmp_path / "official" / "unit_decoder"))
    os.makedirs(tmp_path / "official" / "speaker")
    shutil.copy(CAMPPLUS, tmp_path / "official" / "speaker" / "speaker_embed.onnx")
    voice_generator().save_pretrained(str(tmp_path / "voice"))
    os.makedirs(tmp_path / "audio")
    rows = []
    for k, (wave, text) in enumerate(zip(speech([9000, 16000, 12000, 7000, 14000], seed=4), TEXTS)):
        write_wav(str(tmp_path / "audio" / f"u{k}.wav"), wave)
        rows.append({"id": f"u{k}", "path": f"audio/u{k}.wav", "text": text, "duration": wave.numel() / 16000})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_reconstruct_command_resumes_to_the_same_files(release, capsys, monkeypatch):
    from taste import reconstruct as module
    from taste.speaker import SpeakerEncoder

    base = ["reconstruct", str(release / "manifest.jsonl"), "--model", str(release / "official"), "--voice",
            str(release / "voice"), "--batch-size", "2", "--seed", "7"]  # fmt: skip
    assert main([*base, "-o", str(release / "whole"), "--json", str(release / "summary.json")]) == 0
    printed = capsys.readouterr().out
    assert "reconstructed 5 utterances" in printed and "speaker similarity (CAM++ cosine" in printed
    rows = read_manifest(str(release / "whole" / "manifest.jsonl"))
    assert [r["id"] for r in rows] == [f"u{k}" for k in range(5)] and [r["text"] for r in rows] == TEXTS
    summary = json.loads((release / "summary.json").read_text())
    assert summary["utterances"] == 5 and summary["resumed"] == 0 and summary["sample_rate"] == 22050
    # each row as the library makes it: batches alike in length (u3+u0, u2+u4, u1), batch k seeded with seed + k,
    # the utterances' own CAM++ vectors as speakers
    encoder = SpeakerEncoder.from_official(CAMPPLUS)
    model, voice = Stage1Model.from_pretrained(str(release / "official")), VoiceGenerator.from_pretrained(
        str(release / "voice"))  # fmt: skip
    source = {r["id"]: read_wav(str(release / "audio" / f"{r['id']}.wav"))[0] for r in rows}
    ids = ["u2", "u4"]
    emb = F.normalize(encoder.embed([source[i] for i in ids]), dim=1)
    want = reconstruct(model, [source[i] for i in ids], [TEXTS[2], TEXTS[4]], voice=voice, speaker=emb, seed=8)
    for k, i in enumerate(ids):
        row = next(r for r in rows if r["id"] == i)
        assert row["units"] == want.units[k].tolist() and row["codes"] == want.codes[k].tolist()
        wave, rate = read_wav(row["audio_path"])
        assert rate == 22050 and wave.numel() == want.waves[k].numel()
        assert (wave - want.waves[k].clamp(-1, 1)).abs().max() <= 1 / 32767 + 1e-6  # (16-bit PCM)
        assert row["duration"] == round(wave.numel() / 22050, 4) and row["source"] == f"../audio/{i}.wav"
        made = F.normalize(encoder.embed([want.waves[k]], 22050), dim=1)[0]
        assert row["speaker_similarity"] == pytest.approx(float(made @ emb[k]), abs=1e-5)
    # interrupted in its second batch, then rerun: the same manifest and wavs as the uninterrupted run
    patch_calls(monkeypatch, module, "reconstruct", stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        main([*base, "-o", str(release / "cut")])
    monkeypatch.undo()
    journal = (release / "cut" / "manifest.jsonl.partial").read_text().splitlines()
    assert len(journal) == 3 and not (release / "cut" / "manifest.jsonl").exists()  # header + the first batch
    assert main([*base, "-o", str(release / "cut"), "--seed", "8"]) == 1
    assert "journal of another reconstruction (it differs in seed)" in capsys.readouterr().err
    rerun = patch_calls(monkeypatch, module, "reconstruct")
    assert main([*base, "-o", str(release / "cut")]) == 0
    assert "2 resumed from the journal" in capsys.readouterr().out and len(rerun) == 2  # (the batch kept: not rerun)
    monkeypatch.undo()
    assert (release / "cut" / "manifest.jsonl").read_text() == (release / "whole" / "manifest.jsonl").read_text()
    for k in range(5):
        assert (release / "cut" / "wavs" / f"u{k}.wav").read_bytes() == (
            release / "whole" / "wavs" / f"u{k}.wav").read_bytes()  # fmt: skip
    assert not (release / "cut" / "manifest.jsonl.partial").exists()


def test_reconstruct_command_speakers_asr_and_wer(release, capsys, tmp_path):
    from conftest import whisper_around

    base = ["reconstruct", str(release / "manifest.jsonl"), "--model", str(release / "official"), "--voice",
            str(release / "voice"), "--greedy"]  # fmt: skip
    (release / "spk.json").write_text(json.dumps([0.05] * 192))
    assert main([*base, "--speaker", str(release / "spk.json"), "-o", str(release / "fixed")]) == 0
    assert main([*base, "-o", str(release / "own")]) == 0
    fixed = read_manifest(str(release / "fixed" / "manifest.jsonl"))
    own = read_manifest(str(release / "own" / "manifest.jsonl"))
    assert any(read_wav(a["audio_path"])[0].ne(read_wav(b["audio_path"])[0]).any() for a, b in zip(fixed, own))
    # rows' own vectors come before the CAM++ ones; a manifest where only some rows have one is refused
    rows = [json.loads(line) for line in (release / "manifest.jsonl").read_text().splitlines()]
    for r in rows:
        r["speaker"] = [0.05] * 192
    (release / "with_spk.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [*base, "-o", str(release / "rows")]
    argv[1] = str(release / "with_spk.jsonl")
    assert main(argv) == 0
    for a, b in zip(read_manifest(str(release / "rows" / "manifest.jsonl")), fixed):
        assert torch.equal(read_wav(a["audio_path"])[0], read_wav(b["audio_path"])[0])
    del rows[3]["speaker"]
    (release / "with_spk.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([*argv[:-1], str(release / "rows2")]) == 1
    assert "row 'u3' of" in capsys.readouterr().err
    # --asr: transcripts from the tokenizer's own encoder pass; the manifest's text stays the reference, and the
    # output manifest is what `taste transcribe` scores
    model = Stage1Model.from_pretrained(str(release / "official"))
    whisper_around(model.tokenizer.encoder, tmp_path / "whisper", max_new_tokens=4)
    assert main([*base, "--asr", str(tmp_path / "whisper"), "-o", str(release / "asr")]) == 0
    heard = read_manifest(str(release / "asr" / "manifest.jsonl"))
    assert [r["text"] for r in heard] == TEXTS and all(r["encoded_text"].split() for r in heard)
    capsys.readouterr()
    assert main(["transcribe", str(release / "asr" / "manifest.jsonl"), "--whisper", str(tmp_path / "whisper"),
                 "-o", str(release / "asr" / "heard.jsonl")]) == 0  # fmt: skip
    assert "WER against the manifest's text (5 utterances" in capsys.readouterr().out
    assert main([*base, "--centroids", str(release / "spk.json"), "-o", str(release / "x")]) == 1
    assert "give --centroids" in capsys.readouterr().err


def test_speak_command_turns_codes_into_the_speech_of_the_audio_path(release, capsys, monkeypatch):
    """`taste encode` codes -> `taste speak`: each batch gives what `reconstruct` gives the same utterances from their
    audio (same codes, seed and speaker); and the rows of `taste reconstruct` are codes rows too."""
    model, voice = Stage1Model.from_pretrained(str(release / "official")), voice_generator()
    (release / "spk.json").write_text(json.dumps([0.05] * 192))
    assert main(["encode", str(release / "manifest.jsonl"), "--model", str(release / "official" / "tokenizer"), "-o",
                 str(release / "codes.jsonl"), "--quiet"]) == 0  # fmt: skip
    base = ["speak", str(release / "codes.jsonl"), "--model", str(release / "official"), "--voice",
            str(release / "voice"), "--speaker", str(release / "spk.json"), "--greedy", "--batch-size", "2",
            "--seed", "3"]  # fmt: skip
    assert main([*base, "-o", str(release / "spoken")]) == 0
    assert "5 wavs" in capsys.readouterr().out
    source = [read_wav(str(release / "audio" / f"u{k}.wav"))[0] for k in range(5)]
    # rows u2 and u3: the second batch, seeded 3 + 1
    want = reconstruct(model, source[2:4], TEXTS[2:4], voice=voice, speaker=torch.full((192,), 0.05), seed=4,
                       greedy=True)  # fmt: skip
    for k, wave in zip((2, 3), want.waves):
        got, rate = read_wav(str(release / "spoken" / f"u{k}.wav"))
        assert rate == 22050 and got.numel() == wave.numel()
        assert (got - wave.clamp(-1, 1)).abs().max() <= 1 / 32767 + 1e-6
    # interrupted in its second batch, then rerun: the same wavs as the uninterrupted run
    from taste import reconstruct as module

    patch_calls(monkeypatch, module, "speak", stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        main([*base, "-o", str(release / "cut")])
    assert len((release / "cut" / "speak.jsonl.partial").read_text().splitlines()) == 3  # header + the first batch
    monkeypatch.undo()
    assert main([*base, "--seed", "4", "-o", str(release / "cut")]) == 1
    assert "journal of another speak (it differs in seed)" in capsys.readouterr().err
    rerun = patch_calls(monkeypatch, module, "speak")
    assert main([*base, "-o", str(release / "cut")]) == 0
    assert "2 resumed from the journal" in capsys.readouterr().out and len(rerun) == 2  # (the batch kept: not rerun)
    monkeypatch.undo()
    for k in range(5):
        assert (release / "cut" / f"u{k}.wav").read_bytes() == (release / "spoken" / f"u{k}.wav").read_bytes()
    assert not (release / "cut" / "speak.jsonl.partial").exists()
    # the reconstruction's manifest is a codes file of the same codes
    assert main(["reconstruct", str(release / "manifest.jsonl"), "--model", str(release / "official"), "--voice",
                 str(release / "voice"), "--greedy", "-o", str(release / "recon")]) == 0  # fmt: skip
    codes = [json.loads(line) for line in (release / "codes.jsonl").read_text().splitlines()]
    recon = [json.loads(line) for line in (release / "recon" / "manifest.jsonl").read_text().splitlines()]
    assert [(r["words"], r["codes"], r["codebooks"]) for r in recon] == [
        (r["words"], r["codes"], r["codebooks"]) for r in codes]  # fmt: skip
    assert main(["speak", str(release / "recon" / "manifest.jsonl"), *base[2:], "-o", str(release / "again")]) == 0
    capsys.readouterr()
    # a row without words (a generation that ended at once) is skipped and named
    empty = json.dumps({"id": "nothing", "words": [], "codes": []})
    (release / "with_empty.jsonl").write_text((release / "codes.jsonl").read_text() + empty + "\n")
    assert main(["speak", str(release / "with_empty.jsonl"), *base[2:], "-o", str(release / "skip")]) == 0
    assert "5 wavs" in capsys.readouterr().out.split("; 1 rows without words skipped: nothing")[0]
    assert sorted(os.listdir(release / "skip")) == [f"u{k}.wav" for k in range(5)]  # (and no journal left)
    # bad rows are named
    rows = [dict(r) for r in codes]
    for r in rows:
        r.pop("codebooks")
    rows[1]["speaker"] = [0.1] * 192
    (release / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["speak", str(release / "bad.jsonl"), "--model", str(release / "official"), "--voice",
            str(release / "voice"), "-o", str(release / "bad")]  # fmt: skip
    assert main(argv) == 1
    assert "bad.jsonl:1: no speaker vector: give one for all rows" in capsys.readouterr().err
    rows[0]["codebooks"] = "0123456789abcdef"
    (release / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([*argv, "--speaker", str(release / "spk.json")]) == 1
    assert "bad.jsonl:1: codes of codebooks 0123456789abcdef" in capsys.readouterr().err
    rows[0].pop("codebooks")
    rows[2]["id"] = rows[0]["id"]
    (release / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([*argv, "--speaker", str(release / "spk.json")]) == 1
    assert "two rows have the same id" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reconstruct_on_the_gpu():
    """Models on a GPU, audio and speaker vectors on the host: the unit sampling's generator on the decoder's device,
    the TASTE rows and speakers moved to it, units back on the host; and the codes-file path with them."""
    model, voice = stage1_model().cuda(), voice_generator().cuda()
    waves = speech([9000, 16000])
    speaker = F.normalize(torch.randn(2, 192, generator=torch.Generator().manual_seed(2)), dim=1)
    out = reconstruct(model, waves, TEXTS[:2], voice=voice, speaker=speaker, seed=3, max_new_tokens=12)
    again = reconstruct(model, waves, TEXTS[:2], voice=voice, speaker=speaker, seed=3, max_new_tokens=12)
    assert all(u.device.type == "cpu" and 0 < u.numel() <= 12 and int(u.max()) < 16 for u in out.units)
    assert all(torch.equal(a, b) for a, b in zip(out.units, again.units))
    for units, wave in zip(out.units, out.waves):
        assert wave.device.type == "cpu" and bool(wave.isfinite().all())
        assert wave.numel() == int(voice.config.mel_frames(torch.tensor([units.numel()]))[0]) * voice.config.mel_hop
    cpu = reconstruct(stage1_model(), waves, TEXTS[:2], voice=voice_generator(), speaker=speaker, greedy=True,
                      max_new_tokens=12)  # fmt: skip
    gpu = reconstruct(model, waves, TEXTS[:2], voice=voice, speaker=speaker, greedy=True, max_new_tokens=12)
    assert [c.tolist() for c in gpu.codes] == [c.tolist() for c in cpu.codes]
    for a, b in zip(gpu.waves, cpu.waves):
        assert a.numel() == b.numel()
