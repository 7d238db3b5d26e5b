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

With ``--full`` it instead exports both at the released sizes (CAM++ 6.85 M parameters with its 192-d output, the S3
tokenizer 130 M) to temporary files and prints how far taste.onnx is from onnxruntime and from the PyTorch module,
and the time of each (nothing is written here).
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


def one_thread_session(ort, path: str):
    """An onnxruntime session with one thread, as the official processor makes them."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def median_ms(fn, reps: int) -> tuple[float, torch.Tensor]:
    """The median time of ``reps`` calls of ``fn`` in milliseconds, and the last call's output."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        y = fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[reps // 2] * 1e3, y


def host_share(graph) -> str:
    """How many of the graph's nodes run on host values (shapes and what is computed from them)."""
    return f"{sum(graph._on_host)} of its {len(graph.nodes)} nodes (constants aside) run on the host"


def full() -> None:
    """onnxruntime with one thread, as the official sessions; torch with its default threads (2 here)."""
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
        session, graph = one_thread_session(ort, path), OnnxGraph.from_file(path)
    print(host_share(graph))
    g = torch.Generator().manual_seed(2)
    for n in (100, 300, 1000, 3000):
        x = torch.randn(1, n, 80, generator=g)
        times = {}
        for name, fn in (("onnxruntime", lambda x=x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])),
                         ("taste.onnx", lambda x=x: graph(x)), ("pytorch", lambda x=x: model(x))):  # fmt: skip
            fn()
            times[name] = median_ms(fn, 5)
        ref = times["onnxruntime"][1]
        print(
            f"T={n:5d} frames: max |taste.onnx - onnxruntime| {(times['taste.onnx'][1] - ref).abs().max():.2e}, "
            f"|pytorch - onnxruntime| {(times['pytorch'][1] - ref).abs().max():.2e} (|emb| up to "
            f"{ref.abs().max():.1f}); median ms: " + ", ".join(f"{k} {v[0]:.1f}" for k, v in times.items())
        )
    full_s3(ort, OnnxGraph)


def full_s3(ort, OnnxGraph) -> None:
    from frontend_models import S3TokenizerV1, export_s3

    torch.manual_seed(1)
    model = S3TokenizerV1().eval()
    with torch.no_grad():
        for block in model.blocks:  # keep the residual stream's scale: the tokens then depend on the input
            block.o.weight.mul_(0.1)
            block.mlp[2].weight.mul_(0.1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s3.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_s3(model, path)
        print(f"S3 tokenizer: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
              f"{os.path.getsize(path)} bytes")  # fmt: skip
        session, graph = one_thread_session(ort, path), OnnxGraph.from_file(path)
    print(host_share(graph))
    g = torch.Generator().manual_seed(3)
    for frames in (500, 2000):
        mel = torch.randn(1, 128, frames, generator=g)
        n = torch.tensor([frames], dtype=torch.int32)
        feed = {"feats": mel.numpy(), "feats_length": n.numpy()}
        runs = {"onnxruntime": lambda feed=feed: torch.from_numpy(session.run(None, feed)[0]),
                "taste.onnx": lambda mel=mel, n=n: graph(mel, n),
                "pytorch": lambda mel=mel, n=n: model(mel, n)}  # fmt: skip
        out = {}
        for name, fn in runs.items():
            out[name] = median_ms(fn, 3)
        ref = out["onnxruntime"][1]
        agree = {k: float((v[1] == ref).float().mean()) for k, v in out.items() if k != "onnxruntime"}
        print(f"{frames / 100:.0f} s of audio ({ref.numel()} tokens): tokens equal to onnxruntime's: "
              + ", ".join(f"{k} {v:.2%}" for k, v in agree.items()) + "; median ms: "
              + ", ".join(f"{k} {v[0]:.0f}" for k, v in out.items()))  # fmt: skip
    # nine utterances of 3 to 7 s: one at a time (as the official code), and in one padded batch
    from taste.s3_tokenizer import S3Tokenizer

    tokenizer = S3Tokenizer(graph)
    mels = [torch.randn(128, frames, generator=g) for frames in range(300, 701, 50)]
    lone_ms, lone = median_ms(lambda: [tokenizer(m) for m in mels], 3)
    batch_ms, batched = median_ms(lambda: tokenizer.forward_batch(mels), 3)
    same = all(torch.equal(a, b) for a, b in zip(lone, batched))
    print(f"{len(mels)} utterances of 3 to 7 s: one at a time {lone_ms:.0f} ms, in one padded batch {batch_ms:.0f} ms "
          f"({lone_ms / batch_ms:.2f}x), tokens {'equal' if same else 'NOT equal'}")  # fmt: skip


if __name__ == "__main__":
    full() if "--full" in sys.argv else main()
