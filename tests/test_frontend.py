"""The official front-end's ONNX models run by torch: Kaldi filter banks (taste.audio.kaldi_fbank), the CAM++ speaker
encoder (taste.SpeakerEncoder) and the S3 tokenizer (taste.S3Tokenizer), and their graphs (taste.onnx; its reader
and operators alone: tests/test_onnx.py), against onnxruntime, kaldi-native-fbank, openai-whisper and PyTorch models
(tests/frontend_models.py)."""

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from taste.audio import kaldi_fbank, resample
from taste.onnx import OnnxGraph
from taste.s3_tokenizer import S3Tokenizer
from taste.speaker import SpeakerEncoder

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TINY = os.path.join(DATA, "campplus_tiny.onnx")
S3_TINY = os.path.join(DATA, "s3_tokenizer_tiny.onnx")


@pytest.fixture(scope="module")
def reference():
    from safetensors.torch import load_file

    return load_file(os.path.join(DATA, "frontend_reference.safetensors"))


@pytest.fixture(scope="module")
def encoder():
    return SpeakerEncoder.from_official(TINY)


def test_graph_matches_onnxruntime(reference):
    """The stored file (TorchScript exporter, batch norms folded) on random features: what onnxruntime computed."""
    graph = OnnxGraph.from_file(TINY)
    for frames in (37, 150, 233):  # 150 and 233 frames: a second, partial 100-frame segment in every CAM layer
        got = graph(reference[f"feats_{frames}"])
        torch.testing.assert_close(got, reference[f"emb_{frames}"], atol=2e-5, rtol=1e-5)


def test_exported_campplus_runs_as_pytorch(tmp_path):
    """Another export (other weights) at lengths around the 100-frame segments: the graph gives what the PyTorch
    module gives."""
    pytest.importorskip("onnx")
    from frontend_models import export, tiny

    model = tiny(seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(model, str(tmp_path / "m.onnx"), frames=64)
    graph = OnnxGraph.from_file(tmp_path / "m.onnx")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for frames in (3, 5, 199, 200, 201, 403):
            x = torch.randn(1, frames, 80, generator=g)
            torch.testing.assert_close(graph(x), model(x), atol=2e-5, rtol=1e-5)


def test_fbank_matches_kaldi_native(reference):
    """kaldi-native-fbank's features of the stored waveform (it is float32 inside: ~1e-4 apart on log energies)."""
    feats, frames = kaldi_fbank(reference["wave"][None])
    assert frames.tolist() == [reference["wave_fbank"].shape[0]] == [1 + (20800 - 400) // 160]
    torch.testing.assert_close(feats[0], reference["wave_fbank"], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("length,rate", [(400, 16000), (401, 16000), (559, 16000), (16000, 16000), (12345, 8000)])
def test_fbank_matches_kaldi_native_live(length, rate):
    knf = pytest.importorskip("kaldi_native_fbank")
    wave = 0.2 * torch.randn(length, generator=torch.Generator().manual_seed(length))
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0
    opts.frame_opts.samp_freq = rate
    opts.mel_opts.num_bins = 80
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(rate, wave.tolist())
    fbank.input_finished()
    want = torch.tensor(np.array([fbank.get_frame(i) for i in range(fbank.num_frames_ready)]))
    got, frames = kaldi_fbank(wave[None], sample_rate=rate)
    assert int(frames[0]) == want.shape[0]
    torch.testing.assert_close(got[0], want, atol=1e-3, rtol=1e-4)


def test_fbank_batch_is_each_row_alone():
    g = torch.Generator().manual_seed(0)
    audio = 0.1 * torch.randn(4, 9000, generator=g, dtype=torch.float64)
    lengths = torch.tensor([9000, 4321, 399, 400])
    feats, frames = kaldi_fbank(audio, lengths)
    assert frames.tolist() == [54, 25, 0, 1]
    for i in range(4):
        alone, n = kaldi_fbank(audio[i : i + 1, : int(lengths[i])])
        assert int(n[0]) == int(frames[i])
        torch.testing.assert_close(feats[i, : int(n[0])], alone[0, : int(n[0])])
        assert not feats[i, int(n[0]) :].any()
    assert feats.dtype == torch.float64
    with pytest.raises(ValueError, match=r"lengths must be \(4,\)"):
        kaldi_fbank(audio, torch.tensor([1, 2, 3, 9001]))
    with pytest.raises(ValueError, match=r"audio must be a \(B, T\) float"):
        kaldi_fbank(audio[0])


def test_encoder_is_the_official_processor(encoder, reference):
    """Waveform -> filter banks minus their mean -> the graph: what onnxruntime gave on kaldi-native-fbank's
    features; the speaker vector is the mean of the references' embeddings, scaled to unit length."""
    wave = reference["wave"]
    emb = encoder.embed([wave])
    torch.testing.assert_close(emb, reference["wave_emb"], atol=2e-3, rtol=1e-3)
    other = wave[:8000].flip(0).contiguous()
    both = encoder.embed([wave, other])
    torch.testing.assert_close(both[0], emb[0])
    torch.testing.assert_close(both[1], encoder.embed([other])[0])
    vector = encoder.speaker([wave, other])
    torch.testing.assert_close(vector, F.normalize(both.mean(0), dim=0))
    assert vector.shape == (192,) and abs(float(vector.norm()) - 1) < 1e-6
    # another rate is resampled to 16 kHz first; max_seconds keeps the beginning
    slow = resample(wave, 16000, 22050)
    torch.testing.assert_close(encoder.embed([slow], 22050), encoder.embed([resample(slow, 22050, 16000)]))
    torch.testing.assert_close(encoder.embed([wave], max_seconds=0.5), encoder.embed([wave[:8000]]))


def test_encoder_bad_input(encoder):
    with pytest.raises(ValueError, match=r"waveforms\[1\] is too short for a speaker embedding: 719 samples"):
        encoder.embed([torch.zeros(16000), torch.zeros(719)])
    encoder.embed([torch.randn(720)])  # 3 frames: the shortest that runs
    with pytest.raises(TypeError, match="list of 1-D tensors"):
        encoder.embed(torch.zeros(2, 16000))
    with pytest.raises(ValueError, match=r"waveforms\[0\] must be mono"):
        encoder.embed([torch.zeros(2, 16000)])
    with pytest.raises(ValueError, match="sample_rate has 2 entries for 1 waveforms"):
        encoder.embed([torch.zeros(16000)], [16000, 8000])
    with pytest.raises(ValueError, match="max_seconds must be a positive"):
        encoder.embed([torch.zeros(16000)], max_seconds=0)
    with pytest.raises(ValueError, match=r"feats must be \(B, frames, mel bins\)"):
        encoder(torch.zeros(10, 80))


def test_from_official_layouts(tmp_path, encoder):
    wave = torch.randn(4000, generator=torch.Generator().manual_seed(1))
    want = encoder.embed([wave])
    release = tmp_path / "release" / "cosyvoice"
    release.mkdir(parents=True)
    shutil.copy(TINY, release / "speaker_embed.onnx")
    cosy = tmp_path / "cosy"
    cosy.mkdir()
    shutil.copy(TINY, cosy / "campplus.onnx")
    for path in (tmp_path / "release", cosy, cosy / "campplus.onnx"):
        torch.testing.assert_close(SpeakerEncoder.from_official(str(path)).embed([wave]), want)
    with pytest.raises(FileNotFoundError, match="holds none"):
        SpeakerEncoder.from_official(str(tmp_path))
    from taste.official import import_official, load_official

    models = load_official(str(tmp_path / "release"), ("speaker",))
    assert models.tokenizer is None and models.voice is None
    torch.testing.assert_close(models.speaker.embed([wave]), want)
    written = import_official(str(tmp_path / "release"), str(tmp_path / "out"), ("speaker",))
    assert written == {"speaker": str(tmp_path / "out" / "speaker" / "speaker_embed.onnx")}
    torch.testing.assert_close(SpeakerEncoder.from_official(str(tmp_path / "out")).embed([wave]), want)


def test_speaker_command(tmp_path, encoder, capsys):
    from taste.cli import main
    from taste.cli._common import _read_vector
    from taste.corpus import read_wav, write_wav

    g = torch.Generator().manual_seed(2)
    for i, n in enumerate((12000, 9000)):
        write_wav(str(tmp_path / f"r{i}.wav"), 0.3 * torch.randn(n, generator=g), 16000)
    want = encoder.speaker([read_wav(str(tmp_path / f"r{i}.wav"))[0] for i in range(2)])
    for suffix in (".json", ".npy", ".safetensors", ".pt"):
        out = str(tmp_path / f"spk{suffix}")
        assert main(["speaker", str(tmp_path / "r0.wav"), str(tmp_path / "r1.wav"), "--model", TINY, "-o", out]) == 0
        torch.testing.assert_close(_read_vector(out), want)
    assert "speaker vector (192) of 2 reference(s)" in capsys.readouterr().out
    assert main(["speaker", str(tmp_path / "r0.wav"), "--model", str(tmp_path), "-o", "x.json"]) == 1
    assert "holds none" in capsys.readouterr().err


def test_vocode_takes_a_reference_wav(tmp_path):
    from test_voice import tiny

    from taste.cli import main
    from taste.corpus import read_wav, write_wav

    voice = tiny(spk_dim=192)
    voice.save_pretrained(str(tmp_path / "voice"))
    ref = 0.3 * torch.randn(12000, generator=torch.Generator().manual_seed(3))
    write_wav(str(tmp_path / "ref.wav"), ref, 16000)
    (tmp_path / "u.jsonl").write_text(json.dumps({"id": "a", "units": list(range(12))}) + "\n")
    argv = ["vocode", str(tmp_path / "u.jsonl"), "--voice", str(tmp_path / "voice"), "-o", str(tmp_path / "out"),
            "--speaker", str(tmp_path / "ref.wav"), "--speaker-model", TINY]  # fmt: skip
    assert main(argv) == 0
    speaker = SpeakerEncoder.from_official(TINY).speaker([read_wav(str(tmp_path / "ref.wav"))[0]])
    want = voice.generate([torch.arange(12)], speaker[None], generator=torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(read_wav(str(tmp_path / "out" / "a.wav"))[0], want, atol=1 / 32767, rtol=0)
    assert main(argv[:-2]) == 1  # a .wav speaker with no speaker model anywhere


# --------------------------------------------------------------------------------------------------------------
# S3 tokens
# --------------------------------------------------------------------------------------------------------------


def test_s3_tokens_are_the_official_processors(reference):
    """openai-whisper's 128-bin log-mel of the audio as it is, the frame count, onnxruntime: the stored tokens."""
    tokenizer = S3Tokenizer.from_official(S3_TINY)
    tokens = tokenizer.encode([reference["wave"]])
    assert len(tokens) == 1 and tokens[0].dtype == torch.int64
    assert torch.equal(tokens[0], reference["wave_tokens"].reshape(-1))
    assert tokens[0].numel() == 65  # 20800 samples: 130 frames, 65 tokens at 50 Hz


@pytest.mark.parametrize("length", [201, 4000, 12345, 33333])
@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_log_mel_of_unpadded_audio(length, n_mels):
    whisper = pytest.importorskip("whisper")
    from taste.audio import mel_filters, whisper_log_mel

    wave = 0.2 * torch.randn(length, generator=torch.Generator().manual_seed(length))
    want = whisper.log_mel_spectrogram(np.array([wave.numpy()]), n_mels=n_mels)
    got = whisper_log_mel(wave[None], mel_filters(n_mels), torch.hann_window(400))
    assert got.shape == want.shape == (1, n_mels, length // 160)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_exported_s3_tokenizer_runs_as_pytorch(tmp_path):
    pytest.importorskip("onnx")
    from frontend_models import export_s3, tiny_s3

    model = tiny_s3(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_s3(model, str(tmp_path / "s3.onnx"))
    tokenizer = S3Tokenizer.from_official(str(tmp_path / "s3.onnx"))
    g = torch.Generator().manual_seed(0)
    for frames in (1, 2, 3, 101, 799):
        mel = torch.randn(128, frames, generator=g)
        want = model(mel[None], torch.tensor([frames], dtype=torch.int32))[0]
        assert torch.equal(tokenizer(mel), want) and want.numel() == (frames + 1) // 2


def _waves(*lengths):
    g = torch.Generator().manual_seed(7)
    return [0.3 * torch.randn(n, generator=g) for n in lengths]


def _s3_file(path, masked=True) -> str:
    """A tiny S3 tokenizer whose tokens follow its input (unit codewords, smaller residual updates), exported to
    ``path``; ``masked=False``: one that lets the padding of a batch count (it ignores the frame counts)."""
    pytest.importorskip("onnx")
    from frontend_models import S3TokenizerV1, export_s3, tiny_s3

    class Unmasked(S3TokenizerV1):
        def forward(self, mel, frames):
            return super().forward(mel, torch.maximum(frames, torch.tensor(mel.shape[2], dtype=frames.dtype)))

    model = tiny_s3(seed=3)
    with torch.no_grad():
        for block in model.blocks:
            block.o.weight.mul_(0.1)
            block.mlp[2].weight.mul_(0.1)
        model.codebook.copy_(F.normalize(model.codebook, dim=-1))
    if not masked:
        unmasked = Unmasked(d=32, heads=4, layers=2, codes=64, ctx=400).eval()
        unmasked.load_state_dict(model.state_dict())
        model = unmasked
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_s3(model, str(path))
    return str(path)


def test_s3_batches_give_the_lone_tokens(tmp_path):
    """Padded batches of similar lengths (the graph takes each one's frame count), checked once against lone runs,
    within the frame budget per call, in the input order."""
    waves = _waves(3000, 16000, 5000, 5000, 44000, 201, 9999, 16000)
    for path in (_s3_file(tmp_path / "s3.onnx"), S3_TINY):
        tokenizer = S3Tokenizer.from_official(path)
        want = tokenizer.encode(waves)
        calls = []
        graph_forward = tokenizer.graph.forward
        tokenizer.graph.forward = lambda x, n, f=graph_forward, c=calls: c.append(tuple(x.shape)) or f(x, n)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = tokenizer.encode(waves, batch_frames=400)
        assert [t.tolist() for t in got] == [t.tolist() for t in want]
        assert tokenizer.batches_ok and tokenizer.padding_ok and any(c[0] > 1 for c in calls)
        calls.clear()
        got = tokenizer.encode(waves, batch_frames=400)  # checked: no lone runs now
        assert [t.tolist() for t in got] == [t.tolist() for t in want]
        assert sum(c[0] for c in calls) == len(waves) and all(c[0] == 1 or c[0] * c[2] <= 400 for c in calls), calls
    assert len({t for w in want for t in w.tolist()}) > 1
    assert [t.numel() for t in tokenizer.forward_batch(tokenizer.log_mel(waves[:3]))] == [9, 50, 16]
    with pytest.raises(ValueError, match="batch_frames must be a positive int, got 0"):
        tokenizer.encode(waves, batch_frames=0)
    with pytest.raises(ValueError, match=r"mels\[1\] must be \(128, frames\)"):
        tokenizer.forward_batch([torch.zeros(128, 5), torch.zeros(80, 5)])


def test_s3_batches_fall_back_to_lone_runs(tmp_path):
    """A graph that does not mask the padding, or that fails on a batch, runs every utterance alone (a warning)."""
    waves = _waves(3000, 16000, 5000, 9999)
    tokenizer = S3Tokenizer.from_official(_s3_file(tmp_path / "unmasked.onnx", masked=False))
    want = tokenizer.encode(waves)
    with pytest.warns(UserWarning, match="differ from those of lone runs; every utterance runs alone"):
        got = tokenizer.encode(waves, batch_frames=1000)
    assert [t.tolist() for t in got] == [t.tolist() for t in want] and tokenizer.batches_ok is False
    tokenizer = S3Tokenizer.from_official(S3_TINY)
    tokenizer.forward_batch = lambda mels: (_ for _ in ()).throw(RuntimeError("the batch size is fixed"))
    with pytest.warns(UserWarning, match=r"failed on a batch \(RuntimeError: the batch size is fixed\)"):
        got = tokenizer.encode(waves, batch_frames=1000)
    assert [t.tolist() for t in got] == [t.tolist() for t in tokenizer.encode(waves)]
    tokenizer = S3Tokenizer.from_official(S3_TINY)  # out of memory: not the graph's fault, said as it is
    tokenizer.forward_batch = lambda mels: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("no memory"))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        tokenizer.encode(waves, batch_frames=1000)
    assert tokenizer.batches_ok is None


def test_s3_tokenizer_layouts_and_bad_input(tmp_path):
    wave = 0.3 * torch.randn(8000, generator=torch.Generator().manual_seed(2))
    want = S3Tokenizer.from_official(S3_TINY).encode([wave])[0]
    release = tmp_path / "release" / "cosyvoice"
    release.mkdir(parents=True)
    shutil.copy(S3_TINY, release / "speech_tokenizer_v1.onnx")
    for path in (tmp_path / "release", release, release / "speech_tokenizer_v1.onnx"):
        assert torch.equal(S3Tokenizer.from_official(str(path)).encode([wave])[0], want)
    from taste.official import import_official, load_official

    assert torch.equal(load_official(str(tmp_path / "release"), ("s3_tokenizer",)).s3_tokenizer.encode([wave])[0], want)
    written = import_official(str(tmp_path / "release"), str(tmp_path / "out"), ("s3_tokenizer",))
    assert written["s3_tokenizer"].endswith(os.path.join("s3_tokenizer", "speech_tokenizer_v1.onnx"))
    assert torch.equal(S3Tokenizer.from_official(str(tmp_path / "out")).encode([wave])[0], want)
    # another rate: resampled to 16 kHz first
    tokenizer = S3Tokenizer.from_official(S3_TINY)
    slow = resample(wave, 16000, 24000)
    assert torch.equal(tokenizer.encode([slow], 24000)[0], tokenizer.encode([resample(slow, 24000, 16000)])[0])
    with pytest.raises(FileNotFoundError, match="holds none"):
        S3Tokenizer.from_official(str(tmp_path))
    with pytest.raises(ValueError, match=r"waveforms\[1\] lasts 30.01 s, longer than the 30 s window"):
        tokenizer.encode([wave, torch.zeros(480160)])
    with pytest.raises(ValueError, match=r"waveforms\[0\] is too short for S3 tokens: 200 samples"):
        tokenizer.encode([torch.zeros(200)])
    assert tokenizer.encode([torch.zeros(201)])[0].numel() == 1
    with pytest.raises(ValueError, match=r"mel must be \(128, frames\)"):
        tokenizer(torch.zeros(80, 10))
    with pytest.raises(ValueError, match="takes \\(log-mel, frame count\\)"):
        S3Tokenizer(OnnxGraph.from_file(TINY))


def test_s3_units_command(tmp_path, encoder, capsys):
    """A manifest -> S3 units and CAM++ speaker vectors per row: the official recipe's stage-1 targets."""
    from taste.cli import main
    from taste.corpus import read_wav, write_wav

    g = torch.Generator().manual_seed(4)
    rows = []
    for i, n in enumerate((9000, 15000)):
        write_wav(str(tmp_path / f"a{i}.wav"), 0.3 * torch.randn(n, generator=g), 16000)
        rows.append({"id": f"a{i}", "path": f"a{i}.wav", "text": "some words"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["s3-units", str(tmp_path / "m.jsonl"), "--model", S3_TINY, "--speaker-model", TINY, "--num-units", "64"]
    assert main(argv) == 0
    out = [json.loads(line) for line in open(tmp_path / "m.s3.jsonl")]
    tokenizer = S3Tokenizer.from_official(S3_TINY)
    for i, row in enumerate(out):
        audio = read_wav(str(tmp_path / f"a{i}.wav"))[0]
        assert row["units"] == tokenizer.encode([audio])[0].tolist() and row["path"] == f"a{i}.wav"
        assert (row["unit_rate"], row["num_units"], row["text"]) == (50, 64, "some words")
        torch.testing.assert_close(torch.tensor(row["speaker"]), encoder.speaker([audio]), atol=1e-6, rtol=0)
    assert "S3 units and CAM++ speaker vectors of 2 utterances" in capsys.readouterr().out
    # the manifest vocodes as it is (rows' units and speaker vectors): the S3 resynthesis "topline"
    from test_voice import tiny as tiny_voice

    voice = tiny_voice(num_units=64, spk_dim=192)
    voice.save_pretrained(str(tmp_path / "voice"))
    assert main(["vocode", str(tmp_path / "m.s3.jsonl"), "--voice", str(tmp_path / "voice"), "-o",
                 str(tmp_path / "resynth")]) == 0  # fmt: skip
    want = voice.generate([torch.tensor(out[0]["units"])], torch.tensor([out[0]["speaker"]]),
                          generator=torch.Generator().manual_seed(0))[0]  # fmt: skip
    torch.testing.assert_close(read_wav(str(tmp_path / "resynth" / "a0.wav"))[0], want, atol=1 / 32767, rtol=0)
    assert main(argv[:-2] + ["--num-units", "8", "-o", str(tmp_path / "x.jsonl")]) == 1
    assert "is not below --num-units 8" in capsys.readouterr().err
    # in padded batches: the same units; a row that fails is named
    assert main(argv + ["--batch-frames", "500", "-o", str(tmp_path / "b.jsonl")]) == 0
    assert [json.loads(line)["units"] for line in open(tmp_path / "b.jsonl")] == [row["units"] for row in out]
    assert main(argv + ["--batch-frames", "0"]) == 1
    assert "--batch-frames must be a positive int, got 0" in capsys.readouterr().err
    write_wav(str(tmp_path / "a1.wav"), torch.zeros(100), 16000)
    assert main(argv + ["--batch-frames", "500", "-o", str(tmp_path / "c.jsonl")]) == 1
    assert "row 'a1' (a1.wav): waveforms[0] is too short for S3 tokens: 100 samples" in capsys.readouterr().err


def _graph_inputs(path, device="cpu", frames=120):
    if path == TINY:
        return (torch.randn(1, frames, 80, generator=torch.Generator().manual_seed(5)).to(device),)
    feats = torch.randn(1, 128, frames, generator=torch.Generator().manual_seed(5)).to(device)
    return feats, torch.tensor([frames - 7], dtype=torch.int32, device=device)


@pytest.mark.parametrize("path", [TINY, S3_TINY], ids=["campplus", "s3"])
def test_graph_reads_no_device_value_on_the_host(path):
    """Shapes, and what the graph computes from them, stay Python numbers: the graphs run on the meta device, where
    reading any tensor's values on the host raises (as it would sync a GPU)."""
    graph = OnnxGraph.from_file(path)
    want = graph(*_graph_inputs(path))
    got = graph.to("meta")(*_graph_inputs(path, "meta"))
    assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype
    assert sum(graph._on_host) > 0.25 * len(graph.nodes)


def test_graph_compiles():
    """torch.compile(fullgraph=True) traces the whole graph (its shapes are traced integers) and gives eager's
    result. (The S3 graph without inductor's pattern matcher: its attention-fusion pass fails on it, see README.)"""
    graph = OnnxGraph.from_file(TINY)
    x = _graph_inputs(TINY, frames=90)
    torch.testing.assert_close(torch.compile(graph, fullgraph=True)(*x), graph(*x), atol=2e-5, rtol=1e-5)
    s3 = OnnxGraph.from_file(S3_TINY)
    x = _graph_inputs(S3_TINY)
    assert torch.equal(torch.compile(s3, fullgraph=True, options={"pattern_matcher": False})(*x), s3(*x))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_front_end_on_the_gpu(reference):
    """The graphs' buffers move with .to(device), and every shape operator makes its tensors on the input's device."""
    encoder = SpeakerEncoder.from_official(TINY, device="cuda")
    torch.testing.assert_close(encoder.embed([reference["wave"]]), reference["wave_emb"].cuda(), atol=1e-4, rtol=1e-4)
    tokenizer = S3Tokenizer.from_official(S3_TINY, device="cuda")
    assert torch.equal(tokenizer.encode([reference["wave"]])[0], reference["wave_tokens"].reshape(-1))
    for path in (TINY, S3_TINY):  # the graphs themselves make no host sync (their shapes stay on the host)
        graph = OnnxGraph.from_file(path).cuda()
        x = _graph_inputs(path, "cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = graph(*x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        want = OnnxGraph.from_file(path)(*_graph_inputs(path))
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
