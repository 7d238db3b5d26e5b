import json
import shutil

import pytest
import torch
from conftest import espeak_manifest

from taste import cli, corpus
from taste.cli._common import _read_centroids

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return espeak_manifest(tmp_path_factory, num=12, seed=3)


@needs_espeak
def test_corpus_is_real_varied_speech(manifest):
    rows = corpus.read_manifest(str(manifest))
    assert len(rows) == 12
    assert {"id", "path", "text", "voice", "rate", "pitch", "duration"} <= set(rows[0])
    assert len({r["voice"] for r in rows}) > 3 and len({r["rate"] for r in rows}) > 3
    for row in rows:
        audio, rate = corpus.read_wav(row["audio_path"])
        assert rate == 16000 and abs(audio.numel() / 16000 - row["duration"]) < 1e-3
        assert 0.5 < row["duration"] < 10.0
        assert audio.abs().max() > 0.05  # speech, not silence
        assert row["text"] in corpus.SENTENCES  # the first 50 sentences are the fixed ones


@needs_espeak
def test_units_at_50_hz(manifest, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "units.jsonl"
    assert cli.main(["units", str(manifest), "--k", "16", "--iters", "5", "-o", str(out)]) == 0
    rows = corpus.read_manifest(str(out))  # the paths were rewritten relative to the new manifest
    centroids = load_file(str(tmp_path / "unit_centroids.safetensors"))["centroids"]
    assert centroids.shape == (16, 80)
    assert torch.equal(_read_centroids(str(tmp_path / "unit_centroids.safetensors")), centroids)
    from safetensors.torch import save_file

    save_file({"embed": centroids}, str(tmp_path / "other.safetensors"))  # (before: KeyError: 'centroids')
    with pytest.raises(ValueError, match=r"other.safetensors holds no 'centroids' tensor \(got \['embed'\]\)"):
        _read_centroids(str(tmp_path / "other.safetensors"))
    for row in rows:
        audio, _ = corpus.read_wav(row["audio_path"])
        assert len(row["units"]) == audio.numel() // 320 and row["unit_rate"] == 50
        assert 0 <= min(row["units"]) and max(row["units"]) < 16
    # the units are the nearest centroids of the 50 Hz features
    feats = corpus.unit_features(corpus.read_wav(rows[0]["audio_path"])[0])
    assert feats.shape == (len(rows[0]["units"]), 80)
    nearest = torch.cdist(feats.double(), centroids.double()).argmin(1)
    agree = (nearest == torch.tensor(rows[0]["units"])).float().mean()
    assert agree > 0.99
    assert len(set(u for r in rows for u in r["units"])) > 8


@needs_espeak
def test_encode_command(manifest, tmp_path):
    model_dir, codes = tmp_path / "model", tmp_path / "codes.jsonl"
    assert cli.main(["init-tokenizer", str(model_dir), "--preset", "tiny"]) == 0
    argv = ["encode", str(manifest), "--model", str(model_dir), "-o", str(codes), "--batch-size", "5", "--quiet"]
    with pytest.warns(UserWarning, match=r"stages \[0, 1, 2, 3\] of 4 were never initialised"):  # (once)
        assert cli.main(argv) == 0
    rows = [json.loads(line) for line in open(codes)]
    src = corpus.read_manifest(str(manifest))
    assert [r["id"] for r in rows] == [r["id"] for r in src]
    for r, s in zip(rows, src):
        assert len(r["codes"]) == len(s["text"].split()) == len(r["words"]) and len(r["codes"][0]) == 4
        assert not any(any(word) for word in r["codes"])  # a seed model's codebooks: zeros until stage 1-3


@pytest.mark.filterwarnings("ignore:taste. ResidualVQ stages")  # (a seed model)
@needs_espeak
def test_an_interrupted_encode_resumes_from_its_journal(manifest, tmp_path, monkeypatch, capsys):
    from taste.tokenizer import TasteTokenizer

    model_dir = tmp_path / "model"
    assert cli.main(["init-tokenizer", str(model_dir), "--preset", "tiny"]) == 0

    def encode(out):
        return cli.main(["encode", str(manifest), "--model", str(model_dir), "-o", str(out), "--batch-size", "5",
                         "--quiet"])  # fmt: skip

    assert encode(tmp_path / "whole.jsonl") == 0
    assert not (tmp_path / "whole.jsonl.partial").exists()
    real, calls = TasteTokenizer.encode, []

    def crash_on_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(self, *args, **kwargs)

    out, journal = tmp_path / "codes.jsonl", tmp_path / "codes.jsonl.partial"
    monkeypatch.setattr(TasteTokenizer, "encode", crash_on_second_batch)
    assert encode(out) == 1
    monkeypatch.undo()
    assert not out.exists() and len(journal.read_text().splitlines()) == 1 + 5  # the header and the first batch
    with open(journal, "a") as f:
        f.write('{"index": 3, "id": "utt')  # half-written when the command stopped
    capsys.readouterr()
    assert encode(out) == 0
    printed = capsys.readouterr().out
    assert "encoded 7 utterances" in printed and "5 resumed from the journal" in printed
    assert out.read_text() == (tmp_path / "whole.jsonl").read_text() and not journal.exists()

    # a journal of another encode is refused, not mixed in: another model, or the same directory holding codebooks
    # of another training since
    digest = TasteTokenizer.from_pretrained(str(model_dir)).quantizer.codebook_digest()
    assert {json.loads(line)["codebooks"] for line in out.read_text().splitlines()} == {digest}
    header = {"taste_encode": 1, "manifest": str(manifest), "model": "/elsewhere", "dtype": "float32", "rows": 12,
              "codebooks": digest}  # fmt: skip
    encoded = json.dumps({"index": 0, "id": "utt000000", "codes": [[1, 2, 3, 4]]}) + "\n"
    for changed, value in (("model", "/elsewhere"), ("codebooks", "0123456789abcdef")):
        other = json.dumps({**header, "model": str(model_dir), changed: value}) + "\n"
        journal.write_text(other + encoded)
        assert encode(out) == 1
        assert f"is the journal of another encode (it differs in {changed}); delete it" in capsys.readouterr().err
    # a journal that the previous version wrote (no codebooks in its header) resumes: nothing encoded is lost
    older = {k: v for k, v in header.items() if k != "codebooks"}
    journal.write_text(json.dumps({**older, "model": str(model_dir)}) + "\n" + encoded)
    out.unlink()
    assert encode(out) == 0 and "1 resumed from the journal" in capsys.readouterr().out
    assert json.loads(out.read_text().splitlines()[0])["codes"] == [[1, 2, 3, 4]]
    # unless it holds nothing encoded yet (an encode that failed in its first batch): then it is started again
    journal.write_text(other)
    out.unlink()
    assert encode(out) == 0 and out.read_text() == (tmp_path / "whole.jsonl").read_text()


@pytest.mark.filterwarnings("ignore:taste. ResidualVQ stages")  # (a seed model)
@needs_espeak
def test_encode_errors_name_the_manifest_row(manifest, tmp_path, capsys):
    """Before: "texts[0] has no words", the 0 counting within a batch sorted by duration."""
    rows = [json.loads(line) for line in open(manifest)]
    rows[4]["text"] = "  "
    bad = manifest.parent / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = tmp_path / "model"
    assert cli.main(["init-tokenizer", str(model_dir), "--preset", "tiny"]) == 0
    out = str(tmp_path / "c.jsonl")
    assert cli.main(["encode", str(bad), "--model", str(model_dir), "-o", out, "--batch-size", "4", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"error: row {rows[4]['id']!r} of {bad} (texts) has no words (empty or whitespace only)" in err, err


def test_corpus_refuses_without_espeak(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert cli.main(["corpus", str(tmp_path), "--num", "2"]) == 1
    assert "espeak-ng is not installed" in capsys.readouterr().err


def test_cli_bad_input(tmp_path, capsys):
    assert cli.main(["corpus", str(tmp_path), "--num", "0"]) == 1
    assert "num must be >= 1" in capsys.readouterr().err
    (tmp_path / "m.jsonl").write_text('{"id": "a", "text": "hi"}\n')
    assert cli.main(["units", str(tmp_path / "m.jsonl")]) == 1
    assert "no 'path' field" in capsys.readouterr().err
    assert cli.main(["encode", str(tmp_path / "m.jsonl"), "--model", str(tmp_path / "none"), "-o", "x"]) == 1
    assert "none' is not a directory (expected a TasteTokenizer.save_pretrained directory)" in capsys.readouterr().err
    assert cli.main(["encode", str(tmp_path / "m.jsonl"), "--model", "x", "-o", "x", "--batch-size", "0"]) == 1
    assert "--batch-size must be a positive int, got 0" in capsys.readouterr().err


def test_wav_round_trip(tmp_path):
    x = torch.linspace(-1, 1, 1000)
    corpus.write_wav(str(tmp_path / "a.wav"), x, 8000)
    y, rate = corpus.read_wav(str(tmp_path / "a.wav"))
    assert rate == 8000 and (x - y).abs().max() < 1e-4


def riff(tag: int, channels: int, rate: int, bits: int, samples: bytes, *, extensible=False, extra=b"") -> bytes:
    """A wav file's bytes, written here by hand (Python's wave module writes integer PCM only)."""
    import struct

    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * block, block, bits)
    if extensible:  # cbSize, valid bits, channel mask, then the sub-format GUID, whose first two bytes are the tag
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", tag) + bytes(14)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra + b"data" + struct.pack("<I", len(samples)) + samples
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


@pytest.mark.parametrize("extensible", [False, True])
def test_wavs_of_every_common_encoding(tmp_path, extensible):
    """8-bit unsigned, 16-, 24- and 32-bit integer and 32- and 64-bit float wavs, stereo, in the plain and the
    extensible header and after an odd-sized chunk before the data: the same signal (before: 16-bit only)."""
    import numpy as np

    t = np.linspace(-0.9, 0.9, 501)
    stereo = np.stack([t, -0.5 * t], 1)  # (T, 2): the read averages them, 0.25 t
    encodings = {
        (1, 8): (np.round(stereo * 127) + 128).astype(np.uint8).tobytes(),
        (1, 16): np.round(stereo * 32767).astype("<i2").tobytes(),
        (1, 24): b"".join(int(v).to_bytes(3, "little", signed=True) for v in np.round(stereo * 8388607).ravel()),
        (1, 32): np.round(stereo * 2147483647).astype("<i4").tobytes(),
        (3, 32): stereo.astype("<f4").tobytes(),
        (3, 64): stereo.astype("<f8").tobytes(),
    }
    for (tag, bits), samples in encodings.items():
        path = tmp_path / f"{tag}_{bits}.wav"
        path.write_bytes(
            riff(tag, 2, 22050, bits, samples, extensible=extensible, extra=b"LIST\x03\x00\x00\x00abc\x00")
        )
        audio, rate = corpus.read_wav(str(path))
        assert rate == 22050 and audio.dtype == torch.float32 and audio.shape == (501,)
        tolerance = max(1.5 / 2 ** (bits - 1) if tag == 1 else 0.0, 1e-7)  # (float32 holds 24 bits)
        torch.testing.assert_close(audio, torch.from_numpy(0.25 * t).float(), atol=tolerance, rtol=0, msg=str(path))


def test_wavs_that_cannot_be_read_say_why(tmp_path):
    path = tmp_path / "x.wav"
    path.write_bytes(riff(6, 1, 8000, 8, bytes(100)))  # A-law
    with pytest.raises(ValueError, match="got format tag 6 with 8-bit samples and 1 channels"):
        corpus.read_wav(str(path))
    path.write_bytes(riff(1, 1, 8000, 12, bytes(100)))
    with pytest.raises(ValueError, match="got format tag 1 with 12-bit samples"):
        corpus.read_wav(str(path))
    path.write_bytes(b"ID3\x03" + bytes(40))  # an mp3 named .wav
    with pytest.raises(ValueError, match="x.wav: not a RIFF WAVE file"):
        corpus.read_wav(str(path))
    path.write_bytes(riff(1, 1, 8000, 16, bytes(100))[:36])  # cut before its data chunk
    with pytest.raises(ValueError, match="no data chunk: not a complete wav"):
        corpus.read_wav(str(path))


def test_prosody_ssml():
    p = {"rate": [60, 150, 100], "pitch": [-30, 40, 0], "pause_ms": [300, 0, 0]}
    assert corpus.prosody_ssml("Fish & chips!", p) == (
        '<speak><prosody rate="60%" pitch="-30%">Fish</prosody> <break time="300ms"/> '
        '<prosody rate="150%" pitch="+40%">&amp;</prosody> <prosody rate="100%" pitch="+0%">chips!</prosody></speak>'
    )
    with pytest.raises(ValueError, match="one rate, pitch and pause_ms per word"):
        corpus.prosody_ssml("two words", {"rate": [100], "pitch": [0], "pause_ms": [0]})
    import random

    drawn = corpus.word_prosody(9, random.Random(0))
    assert all(len(v) == 9 for v in drawn.values()) and drawn["pause_ms"][-1] == 0
    assert all(60 <= r <= 160 for r in drawn["rate"]) and all(-30 <= p <= 40 for p in drawn["pitch"])


@needs_espeak
def test_word_prosody_changes_the_speech(tmp_path):
    binary, text = shutil.which("espeak-ng"), "The busy chef slowly repaired the table."
    n = len(text.split())
    plain, rate = corpus._speak(binary, text, "en-us", 170, 50)
    flat, _ = corpus._speak(binary, text, "en-us", 170, 50, {"rate": [100] * n, "pitch": [0] * n, "pause_ms": [0] * n})
    slow = {"rate": [100, 100, 100, 60, 100, 100, 100], "pitch": [0] * n, "pause_ms": [0, 0, 400, 0, 0, 0, 0]}
    slowed, _ = corpus._speak(binary, text, "en-us", 170, 50, slow)
    assert abs(flat.numel() - plain.numel()) < 0.1 * plain.numel()  # neutral prosody ~ the plain sentence
    assert slowed.numel() - flat.numel() > 0.5 * rate  # one slow word and a 400 ms pause: > 0.5 s longer
    assert cli.main(["corpus", str(tmp_path), "--num", "3", "--seed", "1", "--prosody"]) == 0
    rows = corpus.read_manifest(str(tmp_path / "manifest.jsonl"))
    assert all(len(r["prosody"]["rate"]) == len(r["text"].split()) for r in rows)


def test_manifest_errors_name_the_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "path": "a.wav", "text": "hi"}\n\n{"id": "b", "path": "b.wav", "text": "hi"\n')
    with pytest.raises(ValueError, match=r"m.jsonl:3: not valid JSON: Expecting ',' delimiter"):
        corpus.read_manifest(str(path))
    path.write_text('{"id": "a", "path": "a.wav", "text": "hi"}\n"b.wav"\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: a manifest row must be a JSON object, got str"):
        corpus.read_manifest(str(path))
