"""Writes tests/data/campplus_tiny.onnx, s3_tokenizer_tiny.onnx and frontend_reference.safetensors for
tests/test_frontend.py: a small CAM++ and a small S3 tokenizer (tests/frontend_models.py, random weights, seed 0)
exported by torch's TorchScript ONNX exporter (CAM++'s batch norms folded into the convolutions, as in CosyVoice's
file), and what onnxruntime, kaldi-native-fbank and openai-whisper compute with them:

- ``feats_<T>`` (1, T, 80) random features and ``emb_<T>`` onnxruntime's CAM++ embedding of them, T = 37, 150, 233;
- ``wave`` (1.3 s, 16 kHz, a seeded chirp plus noise), ``wave_fbank`` kaldi-native-fbank's features of it (no
  dither) and ``wave_emb`` onnxruntime's embedding of those features minus their mean (the official processor);
- ``wave_tokens``: onnxruntime's S3 tokens of ``whisper.log_mel_spectrogram(wave, n_mels=128)`` with its frame count
  (the official processor's ``_get_speech_token``).

    python tests/data/make_frontend_reference.py    # needs onnx, onnxruntime, kaldi-native-fbank, openai-whisper

With ``--full`` it instead exports the released size (7.2 M parameters) to a temporary file and prints how far
taste.onnx is from onnxruntime and from the PyTorch module, and the time of each (nothing is written here).
"""

import math
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
FRAMES = (37, 150, 233)


def test_wave() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    t = torch.arange(20800) / 16000
    chirp = 0.3 * torch.sin(2 * math.pi * (150 * t + 400 * t * t))
    return (chirp + 0.02 * torch.randn(t.shape, generator=g)).float()


def kaldi_native(wave: torch.Tensor) -> torch.Tensor:
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0
    opts.mel_opts.num_bins = 80
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(16000, wave.tolist())
    fbank.input_finished()
    return torch.tensor(np.array([fbank.get_frame(i) for i in range(fbank.num_frames_ready)]))


def main() -> None:
    import onnxruntime as ort
    import whisper
    from frontend_models import export, export_s3, tiny, tiny_s3
    from safetensors.torch import save_file

    path = os.path.join(HERE, "campplus_tiny.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(tiny(0), path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    run = lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])  # noqa: E731
    out, g = {}, torch.Generator().manual_seed(1)
    for n in FRAMES:
        out[f"feats_{n}"] = torch.randn(1, n, 80, generator=g)
        out[f"emb_{n}"] = run(out[f"feats_{n}"])
    out["wave"] = test_wave()
    out["wave_fbank"] = kaldi_native(out["wave"])
    feats = out["wave_fbank"] - out["wave_fbank"].mean(0, keepdim=True)
    out["wave_emb"] = run(feats[None].float())
    s3_path = os.path.join(HERE, "s3_tokenizer_tiny.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_s3(tiny_s3(0), s3_path)
    session = ort.InferenceSession(s3_path, providers=["CPUExecutionProvider"])
    mel = whisper.log_mel_spectrogram(np.array([out["wave"].numpy()]), n_mels=128)
    frames = np.array([mel.shape[2]], dtype=np.int32)
    out["wave_tokens"] = torch.from_numpy(session.run(None, {"feats": mel.numpy(), "feats_length": frames})[0])
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(HERE, "frontend_reference.safetensors"))
    print(
        f"wrote {path} ({os.path.getsize(path)} bytes), {s3_path} ({os.path.getsize(s3_path)} bytes) and "
        "frontend_reference.safetensors"
    )


def full() -> None:
    import onnxruntime as ort
    from frontend_models import CamPlusPlus, export, randomized

    from taste.onnx import OnnxGraph

    torch.set_grad_enabled(False)
    model = randomized(CamPlusPlus(), 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "campplus.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export(model, path)
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {os.path.getsize(path)} bytes")
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1  # as the official processor
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        graph = OnnxGraph.from_file(path)
    g = torch.Generator().manual_seed(2)
    for n in (100, 300, 1000, 3000):
        x = torch.randn(1, n, 80, generator=g)
        times = {}
        for name, fn in (("onnxruntime", lambda x=x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])),
                         ("taste.onnx", lambda x=x: graph(x)), ("pytorch", lambda x=x: model(x))):  # fmt: skip
            fn()
            runs = []
            for _ in range(5):
                t = time.perf_counter()
                y = fn()
                runs.append(time.perf_counter() - t)
            times[name] = (sorted(runs)[2] * 1e3, y)
        ref = times["onnxruntime"][1]
        print(
            f"T={n:5d} frames: max |taste.onnx - onnxruntime| {(times['taste.onnx'][1] - ref).abs().max():.2e}, "
            f"|pytorch - onnxruntime| {(times['pytorch'][1] - ref).abs().max():.2e} (|emb| up to "
            f"{ref.abs().max():.1f}); median ms: " + ", ".join(f"{k} {v[0]:.1f}" for k, v in times.items())
        )


if __name__ == "__main__":
    full() if "--full" in sys.argv else main()
