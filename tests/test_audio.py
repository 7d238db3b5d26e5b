import math

import numpy as np
import pytest
import torch

from taste.audio import LogMel, batch_waveforms, mel_filters, resample


def waves(seed=0, lengths=(16000 * 3 + 17, 16000 * 10, 555, 1)):
    g = torch.Generator().manual_seed(seed)
    return [0.1 * torch.randn(n, generator=g) for n in lengths]


@pytest.mark.parametrize("n_mels,seconds", [(128, 30.0), (80, 30.0), (80, 10.0)])
def test_matches_transformers_feature_extractor(n_mels, seconds):
    transformers = pytest.importorskip("transformers")
    ws = waves()
    audio, lengths = batch_waveforms(ws, window_seconds=seconds)
    assert audio.shape == (4, int(seconds * 16000)) and lengths.tolist() == [w.numel() for w in ws]
    ours = LogMel(n_mels=n_mels, window_seconds=seconds)(audio)
    fe = transformers.WhisperFeatureExtractor(feature_size=n_mels, chunk_length=int(seconds))
    ref = fe([w.numpy() for w in ws], sampling_rate=16000, return_tensors="pt").input_features
    assert ours.shape == ref.shape == (4, n_mels, int(seconds * 100))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_matches_openai_whisper_log_mel():
    whisper = pytest.importorskip("whisper")
    ws = waves(1, (16000 * 4, 16000 * 7 + 3))
    ours = LogMel(n_mels=128)(batch_waveforms(ws)[0])
    ref = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(w), n_mels=128) for w in ws])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_batch_invariant():
    ws = waves(2)
    mel = LogMel(n_mels=80)
    together = mel(batch_waveforms(ws)[0])
    for i, w in enumerate(ws):
        assert torch.equal(mel(batch_waveforms([w])[0])[0], together[i])
    for chunk in (3, 4):  # STFT calls of several utterances (4 per call is the default on GPUs), the last one short
        assert torch.equal(LogMel(n_mels=80, chunk=chunk)(batch_waveforms(ws)[0]), together)


def test_a_model_cast_to_half_precision_keeps_float32_features():
    """A bfloat16 model holding the front-end (.to(dtype), .half()) cast its filters and window there and back,
    rounding them: the features then differed by ~0.1 (the ASR's own front-end drew other transcripts)."""
    ws = waves(3)
    want = LogMel(n_mels=80)(batch_waveforms(ws)[0])
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.half().float()):
        mel = cast(torch.nn.Sequential(LogMel(n_mels=80)))[0]
        assert mel.filters.dtype == mel.window.dtype == torch.float32
        assert torch.equal(mel(batch_waveforms(ws)[0]), want)


def test_filters_are_openai_whispers():
    f = mel_filters(80)
    assert f.shape == (80, 201) and f.dtype == torch.float32 and bool((f >= 0).all())
    with pytest.raises(ValueError, match="n_mels must be 80 or 128"):
        mel_filters(64)


@pytest.mark.parametrize("rate", [8000, 22050, 24000, 44100, 48000])
def test_resample_keeps_a_tone(rate):
    t = torch.arange(rate) / rate
    y = resample(torch.sin(2 * math.pi * 440 * t), rate, 16000)
    assert y.numel() == 16000
    expected = torch.sin(2 * math.pi * 440 * torch.arange(16000) / 16000)
    assert (y - expected)[200:-200].abs().max() < 2e-3  # edges see the zero padding
    # a tone above the new Nyquist frequency (past the filter's transition band) is filtered out
    if rate > 16000:
        high = resample(torch.sin(2 * math.pi * 11000 * t), rate, 16000)
        assert high[200:-200].abs().max() < 0.02


def test_resample_against_scipy():
    signal = pytest.importorskip("scipy.signal")
    x = torch.randn(22050, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours = resample(x, 22050, 16000)
    ref = torch.from_numpy(signal.resample_poly(x.numpy(), 320, 441, window=("kaiser", 8.0)))
    n = min(ours.numel(), ref.numel())
    assert torch.corrcoef(torch.stack([ours[100 : n - 100], ref[100 : n - 100]]))[0, 1] > 0.999


def test_resample_batched_and_identity():
    x = torch.randn(3, 2, 1000)
    y = resample(x, 48000, 16000)
    assert y.shape == (3, 2, 334)
    torch.testing.assert_close(y[1, 0], resample(x[1, 0], 48000, 16000))
    assert resample(x, 16000, 16000) is x


def test_resampled_batch_and_truncate():
    w = torch.sin(torch.arange(44100 * 2) * 0.01)
    audio, lengths = batch_waveforms([w, w[:4410]], sample_rate=[44100, 44100], window_seconds=10)
    assert lengths.tolist() == [32000, 1600]
    audio, lengths = batch_waveforms([torch.zeros(16000 * 12)], window_seconds=10, truncate=True)
    assert lengths.tolist() == [160000]


def test_sample_rates_as_readers_give_them():
    """A rate may come as a NumPy or 0-d tensor integer or an integral float (readers and configs give those), one
    for all or one per waveform; anything else is refused with the argument's name."""
    w = torch.sin(torch.arange(8000) * 0.01)
    want, _ = batch_waveforms([w], sample_rate=8000, window_seconds=1)
    for rate in (np.int64(8000), np.int32(8000), 8000.0, np.float32(8000), torch.tensor(8000)):
        torch.testing.assert_close(batch_waveforms([w], sample_rate=rate, window_seconds=1)[0], want)
    for rates in ([8000.0], (np.int64(8000),), np.array([8000]), torch.tensor([8000])):
        torch.testing.assert_close(batch_waveforms([w], sample_rate=rates, window_seconds=1)[0], want)
    with pytest.raises(ValueError, match=r"sample_rate must be a positive integer \(samples per second\), got 8000.5"):
        batch_waveforms([w], sample_rate=8000.5)
    with pytest.raises(ValueError, match=r"sample_rate\[1\] must be a positive integer .*got -16000"):
        batch_waveforms([w, w], sample_rate=[8000, -16000])
    with pytest.raises(TypeError, match="sample_rate must be a positive integer .*got str"):
        batch_waveforms([w], sample_rate="16000")
    with pytest.raises(TypeError, match=r"sample_rate\[0\] must be a positive integer .*got NoneType"):
        batch_waveforms([w], sample_rate=[None])
    with pytest.raises(TypeError, match="sample_rate must be a positive integer .*got bool"):
        batch_waveforms([w], sample_rate=True)


def test_bad_audio():
    with pytest.raises(ValueError, match=r"waveforms\[1\] is empty"):
        batch_waveforms([torch.zeros(10), torch.zeros(0)])
    with pytest.raises(ValueError, match=r"waveforms\[0\] contains NaN"):
        batch_waveforms([torch.tensor([0.0, float("nan")])])
    with pytest.raises(ValueError, match=r"waveforms\[0\] must be mono"):
        batch_waveforms([torch.zeros(2, 100)])
    with pytest.raises(ValueError, match=r"waveforms\[0\] lasts 31.00 s, longer than the 30 s window"):
        batch_waveforms([torch.zeros(16000 * 31)])
    with pytest.raises(TypeError, match="floating point"):
        batch_waveforms([torch.zeros(10, dtype=torch.int16)])
    with pytest.raises(ValueError, match="waveforms is empty"):
        batch_waveforms([])
    with pytest.raises(TypeError, match="list of 1-D tensors"):
        batch_waveforms(torch.zeros(2, 100))
    with pytest.raises(ValueError, match=r"orig_rate must be a positive integer \(samples per second\), got 0"):
        resample(torch.zeros(10), 0)
    with pytest.raises(ValueError, match="more than the window"):
        LogMel(n_mels=80, window_seconds=1.0)(torch.zeros(1, 16001))
    assert np.isfinite(LogMel(n_mels=80, window_seconds=1.0)(torch.zeros(1, 16000)).numpy()).all()
    with pytest.raises(ValueError, match="chunk must be >= 1 or None, got 0"):
        LogMel(n_mels=80, chunk=0)


def test_a_full_window_batch_is_not_copied():
    """Audio that already fills the window goes to the STFT as it is: the allocations of one call peak at the
    features plus one utterance's spectrum, well below another copy of the batch (which a pad of nothing made)."""
    import common

    audio = torch.randn(64, 16000) * 0.1  # 4 MB; 1 s windows
    mel = LogMel(n_mels=80, window_seconds=1.0)  # (on the CPU: one utterance at a time)
    features_mb = 64 * 80 * 100 * 4 / 2**20
    peak = common.peak_mb(lambda: mel(audio), "cpu")
    assert features_mb <= peak < features_mb + 0.5 * audio.numel() * 4 / 2**20, peak
