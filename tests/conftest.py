"""Shared helpers: devices, tolerances and random packed batches with the awkward cases built in."""

from __future__ import annotations

import datetime
import json
import os
import sys
import warnings

import pytest

# pytest-xdist workers (`pytest -n auto`, the README's test command) share the machine's cores: each takes its share
# of CPU threads, and so do the processes the tests start (DDP ranks, the command line), or every worker's OpenMP
# threads wait on each other (on 2 cores, 2 workers of 2 threads each ran the suite slower than one process).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, _cores // _WORKERS))

import torch  # noqa: E402

if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# bench/ holds the official-style baselines that some tests cross-check against. Only that folder goes on the
# path: the repository root would shadow the installed `taste` package with the source tree.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

HAS_CUDA = torch.cuda.is_available()
TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (correctness only). Triton reads
# this when a kernel is decorated, i.e. when taste.kernels.* is first imported, which happens after conftest.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
on_triton_interpreter = pytest.mark.skipif(not INTERPRET, reason="set TRITON_INTERPRET=1 (automatic without a GPU)")


def _fix_triton_36_interpreter_for_numpy_24() -> None:
    """Triton 3.5's and 3.6's interpreters (the Triton of torch 2.9, and of torch 2.10 and 2.11, the GPU image's)
    convert a tensor used as an index, e.g. a ``range`` bound taken from a kernel argument, with ``int()`` of a
    one-element array, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"):
    every kernel with such a loop fails in it. Triton 3.8 squeezes the array first; this gives 3.5 and 3.6 the same
    conversion. Tests only: compiled kernels never run this code."""
    import numpy as np

    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    version = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
    try:
        with warnings.catch_warnings():  # NumPy 1.25 to 2.3 warn that this is deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            int(np.ones(1))
        return  # NumPy < 2.4: nothing to fix
    except TypeError:
        pass
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if version >= (3, 7) or original is None:
        return

    def patch(tensor, *scope):  # Triton 3.6 passes a scope that restores what it set; 3.5 sets attributes directly
        original(tensor, *scope)
        index = lambda self: int(self.handle.data.squeeze())  # noqa: E731
        if scope:
            scope[0].set_attr(tensor, "__index__", index)  # restored in reverse order
        else:
            tensor.__index__ = index

    interpreter._patch_lang_tensor = patch


if INTERPRET:
    _fix_triton_36_interpreter_for_numpy_24()
cuda = pytest.mark.cuda
needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def _has_extension() -> bool:
    from taste import ops

    return ops.HAS_EXTENSION


# Tests of the registered torch.library ops (opcheck) and of what their fake kernels make possible (fullgraph compiles
# through data-dependent sizes). Without taste._C the ops run their references instead (tests/test_extension.py
# fails then, so such a run cannot pass unnoticed).
needs_extension = pytest.mark.skipif(not _has_extension(), reason="needs the compiled extension taste._C")

# (atol, rtol) by dtype, STYLE.md.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1.3e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}

# Ragged batch shapes: B = 1, empty and length-1 sequences, odd sizes, one long sequence.
LENGTH_CASES = [[1], [7], [0], [3, 0, 1, 5], [13, 1, 0, 0, 29, 2], [100, 97, 3, 64, 1, 0, 55, 111]]


# The tensors the released TASTE checkpoint saves, as [name, shape, dtype]: a copy of the spec's
# official_state_dict.json (built from the official code on the meta device, no weights), so that the tests that
# check our models' names and shapes against the release run in any checkout (test_official.py checks the copy).
OFFICIAL_STATE_DICT = os.path.join(os.path.dirname(__file__), "data", "official_state_dict.json")


def official_keys() -> list:
    with open(OFFICIAL_STATE_DICT) as f:
        return json.load(f)["keys"]


def make_cu(lengths, device="cpu") -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return cu.to(device)


def random_word_ids(lengths, gen: torch.Generator, p_new: float = 0.45, dtype=torch.int32, device="cpu"):
    """Packed word ids: each token starts a new word with probability p_new (so length-1 and long words occur)."""
    parts = []
    for n in lengths:
        starts = torch.rand(n, generator=gen) < p_new
        if n:
            starts[0] = True
        parts.append(starts.long().cumsum(0) - 1)
    ids = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return ids.to(dtype=dtype, device=device)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None):
    atol, rtol = TOL[dtype or actual.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def skip_unless_launches_go_through_run() -> None:
    """Skips the calling test where a kernel launch does not call the kernel's ``run`` method, which the tests hook
    to count or refuse launches: Triton's interpreter before 3.5 (torch 2.8's Triton 3.4) launches straight from
    ``kernel[grid]``. Only the hooks are missing there; the launchers work the same."""
    if not INTERPRET:
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not hasattr(InterpretedFunction, "run"):
        import triton

        pytest.skip(f"Triton {triton.__version__}'s interpreter launches without the kernel's run(), which this hooks")


def refuse_tiles(monkeypatch, kernels, refuse) -> list[tuple[str, dict]]:
    """Makes the Triton ``kernels`` act as on a GPU with little shared memory: a launch whose meta-parameters
    ``refuse(kwargs)`` rejects raises Triton's ``OutOfResources`` before anything runs, as Triton does for a build
    that does not fit. Returns the list of (kernel name, meta-parameters) of every launch tried. The launchers'
    memory of which tiles fit (``taste.kernels._FITTING``) starts empty."""
    skip_unless_launches_go_through_run()
    from triton.runtime.errors import OutOfResources

    from taste import kernels as kernel_package

    monkeypatch.setattr(kernel_package, "_FITTING", {})
    tried = []
    for kernel in kernels:

        def run(*args, _run=kernel.run, _name=kernel.__name__, **kwargs):
            tried.append((_name, {k: v for k, v in kwargs.items() if k.startswith("BLOCK") or k == "num_stages"}))
            if refuse(kwargs):
                raise OutOfResources(2**20, 64 * 1024, "shared memory")
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return tried


def torchrun_rank_digests(subcommand: str, config: dict, out_dir, ranks: int = 2) -> list[str]:
    """Runs ``taste SUBCOMMAND CONFIG`` under torchrun with ``ranks`` CPU processes (gloo) and returns the weight
    digest each rank wrote (the config must set ``write_rank_digests``). The rendezvous port is one the OS finds
    free, so two test runs on one machine do not collide."""
    import json
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    path = str(out_dir).rstrip("/") + ".json"
    with open(path, "w") as f:
        json.dump(config, f)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port),
           "-m", "taste.cli", subcommand, path, "--quiet"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [open(os.path.join(str(out_dir), f"rank{r}.sha256")).read() for r in range(ranks)]


def require_taslm_dependencies() -> None:
    """Skips the calling test module unless transformers >= 4.53.1 (packed sequences are masked from restarting
    position ids) and peft are installed: what TASLM needs."""
    masking = pytest.importorskip("transformers.masking_utils", reason="TASLM needs transformers >= 4.53.1")
    if not hasattr(masking, "find_packed_sequence_indices"):
        pytest.skip("TASLM needs transformers >= 4.53.1 (packed sequences)", allow_module_level=True)
    pytest.importorskip("peft")


def _gloo_rank(rank, world, init_file, out, body):
    """One of ``world`` gloo ranks: writes ``body(rank, out)`` to ``out/rank{rank}.json``."""
    import torch.distributed as dist

    # A collective that one rank never joins fails after 60 s instead of hanging the suite.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    result = body(rank, out)  # an exception here reaches the test through torch.multiprocessing.spawn
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    # Leave without tearing the gloo group down: its teardown racing the peer's exit aborted a rank once (SIGABRT,
    # "terminate called without an active exception") after all the work was done.
    os._exit(0)


def on_two_ranks(body, out) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    torch.multiprocessing.spawn(_gloo_rank, args=(2, str(out / "init"), str(out), body), nprocs=2)
    return [json.load(open(out / f"rank{r}.json")) for r in range(2)]


def tiny_whisper_dir(path, *, vocab_size=51866, seed=2, encoder_layers=2, decoder_layers=1, frames=150):
    """A random transformers Whisper (width 64, 80 mels, ``frames`` encoder positions: a ``frames / 50`` s window)
    saved to ``path``, as a local checkpoint is; returns the model."""
    transformers = pytest.importorskip("transformers")
    config = transformers.WhisperConfig(
        vocab_size=vocab_size, num_mel_bins=80, d_model=64, encoder_layers=encoder_layers,
        decoder_layers=decoder_layers, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=96,
        decoder_ffn_dim=96, max_source_positions=frames, max_target_positions=64,
    )  # fmt: skip
    torch.manual_seed(seed)
    whisper = transformers.WhisperModel(config).eval()
    whisper.save_pretrained(str(path))
    return whisper


def espeak_manifest(tmp_path_factory, *, num: int, seed: int):
    """A `taste corpus` of ``num`` espeak-ng utterances in a fresh directory; its manifest path (skips the test
    where espeak-ng is not installed)."""
    import shutil

    from taste import cli

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    out = tmp_path_factory.mktemp("corpus")
    assert cli.main(["corpus", str(out), "--num", str(num), "--seed", str(seed)]) == 0
    return out / "manifest.jsonl"


def save_whisper_for_asr(model, path, *, suppress=(), max_new_tokens: int = 16, eos_scale: float = 6.0):
    """Saves a random transformers ``WhisperForConditionalGeneration`` to ``path`` with large-v3's generation rules
    (English, transcribe, no timestamps; ``suppress`` and every timestamp banned; at most ``max_new_tokens``, which
    transformers' versions count alike, where they count ``max_length`` differently), its <|endoftext|> embedding
    drawn anew and scaled so that transcripts end at different steps (as the padding id it starts at zero).
    Timestamps are banned because a random decoder draws them, and transformers' generate starts decoding again
    after two in a row (``taste.asr``)."""
    with torch.no_grad():
        weight = model.model.decoder.embed_tokens.weight
        std = model.config.init_std
        weight[50257] = std * eos_scale * torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(0))
    g = model.generation_config
    g.decoder_start_token_id, g.eos_token_id, g.pad_token_id = 50258, 50257, 50257
    g.lang_to_id, g.task_to_id = {"<|en|>": 50259}, {"transcribe": 50360, "translate": 50359}
    g.is_multilingual, g.no_timestamps_token_id = True, 50364
    g.suppress_tokens, g.begin_suppress_tokens = [*suppress, *range(50365, 51866)], [220, 50257]
    g.max_new_tokens = max_new_tokens
    model.save_pretrained(str(path))
    return model


def whisper_config(**shapes):
    """A transformers WhisperConfig of large-v3's vocabulary and special ids with these shapes."""
    transformers = pytest.importorskip("transformers")
    return transformers.WhisperConfig(vocab_size=51866, eos_token_id=50257, pad_token_id=50257,
                                      decoder_start_token_id=50258, **shapes)  # fmt: skip


def whisper_around(encoder, path, *, decoder_layers: int = 1, init_std: float = 0.4, **rules):
    """A Whisper checkpoint at ``path`` whose encoder holds the weights of ``encoder`` (a taste SpeechEncoder: the
    same parameter names) and whose decoder is random (:func:`save_whisper_for_asr`): what a TASTE tokenizer and
    the Whisper that shares its encoder look like, at any shapes."""
    transformers = pytest.importorskip("transformers")
    c = encoder.config
    config = whisper_config(
        num_mel_bins=c.n_mels, d_model=c.d_model, encoder_layers=c.num_layers, decoder_layers=decoder_layers,
        encoder_attention_heads=c.num_heads, decoder_attention_heads=c.num_heads, encoder_ffn_dim=c.ffn_dim,
        decoder_ffn_dim=c.ffn_dim, max_source_positions=c.frames, max_target_positions=64, init_std=init_std,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config).eval()
    model.model.encoder.load_state_dict(encoder.state_dict())
    return save_whisper_for_asr(model, path, **rules)


def tiny_stage1(spk_dim: int = 80, num_units: int = 16):
    """A tiny random stage-1 model (seed 0) whose RVQ codebooks are drawn and marked initialised, so that its codes
    differ with the audio as a trained tokenizer's do, with no training."""
    from taste.train import Stage1Model

    torch.manual_seed(0)
    model = Stage1Model.from_preset("tiny", num_units=num_units, freeze_encoder=None, spk_dim=spk_dim)
    with torch.no_grad():
        model.tokenizer.quantizer.embed.normal_()
        model.tokenizer.quantizer.initted.fill_(1)
    return model
