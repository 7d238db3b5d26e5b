"""The released checkpoint: S3 units to speech, the environment report, import-official."""

from __future__ import annotations

import json
import os
import time

from taste.cli._common import _device, _load_voice, _speaker_encoder, _speaker_vector


def cmd_vocode(args) -> None:
    import torch

    from taste._checks import check_positive_int
    from taste.checkpoint import iter_json_objects
    from taste.corpus import write_wav

    check_positive_int(args.batch_size, "--batch-size")
    device = _device(args.device)
    t = time.perf_counter()
    gen = _load_voice(args.voice, device)
    loaded = time.perf_counter() - t
    if args.speaker:
        wav = args.speaker.endswith(".wav")
        default = _speaker_vector(args.speaker, _speaker_encoder(args.speaker_model, args.voice) if wav else None)
    else:
        default = torch.zeros(gen.config.spk_dim)
    rows = []
    for where, row in iter_json_objects(args.units, "units rows"):
        units = row.get("units")
        if not isinstance(units, list) or not units or not all(isinstance(u, int) for u in units):
            raise ValueError(f"{where}: 'units' must be a non-empty list of integer ids")
        speaker = torch.tensor(row["speaker"], dtype=torch.float32) if "speaker" in row else default
        if speaker.shape != (gen.config.spk_dim,):
            raise ValueError(f"{where}: the speaker vector must have {gen.config.spk_dim} values, got "
                             f"{tuple(speaker.shape)}")  # fmt: skip
        name = str(row.get("id", len(rows)))
        if not name or os.sep in name or name in (".", ".."):
            raise ValueError(f"{where}: the id {name!r} cannot name a file")
        rows.append((name, torch.tensor(units), speaker))
    names = [name for name, _, _ in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"{args.units}: two rows have the same id: each becomes <id>.wav")
    os.makedirs(args.output, exist_ok=True)
    generator, t, seconds = torch.Generator().manual_seed(args.seed), time.perf_counter(), 0.0
    for lo in range(0, len(rows), args.batch_size):
        part = rows[lo : lo + args.batch_size]
        speaker = torch.stack([s for _, _, s in part])
        waves = gen.generate([u for _, u, _ in part], speaker, generator=generator)
        for (name, _, _), wave in zip(part, waves):
            write_wav(os.path.join(args.output, f"{name}.wav"), wave.float().cpu(), gen.sample_rate)
            seconds += wave.numel() / gen.sample_rate
    elapsed = time.perf_counter() - t
    print(f"{len(rows)} wavs, {seconds:.1f} s of speech in {elapsed:.1f} s on {device} (loaded in {loaded:.1f} s) "
          f"-> {args.output}")  # fmt: skip


def environment() -> dict:
    """What this installation has: versions, the compiled extension and its GPU architectures, the GPUs and whether
    the extension has code for each, and the optional pieces (tokenizer files, espeak-ng, transformers, peft)."""
    import importlib.metadata
    import platform
    import shutil

    import torch
    import triton

    import taste
    from taste import ops
    from taste.text import _package_file

    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    def package_file(package, relative):
        try:
            return bool(_package_file(package, relative, package))
        except (ModuleNotFoundError, FileNotFoundError):
            return False

    gpus = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        major, minor = torch.cuda.get_device_capability(i)
        gpus.append({"index": i, "name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}",
                     "extension_has_code": ops.cuda_arch_covers((major, minor))})  # fmt: skip
    return {
        "taste": taste.__version__,
        "location": os.path.dirname(taste.__file__),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton.__version__,
        "extension": ops.HAS_EXTENSION,
        "extension_cuda_arch_list": ops.CUDA_ARCH_LIST,
        "gpus": gpus,
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "whisper_tokenizer_files": package_file("whisper", "assets/multilingual.tiktoken"),
        "llama3_tokenizer_file": package_file("llama_models", "llama3/tokenizer.model"),
        "espeak_ng": shutil.which("espeak-ng"),
        "transformers": version("transformers"),
        "peft": version("peft"),
        "safetensors": version("safetensors"),
    }


def cmd_info(args) -> None:
    info = environment()
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key != "gpus":
            print(f"{key}: {value}")
    if not info["gpus"]:
        print("gpus: none visible")
    for gpu in info["gpus"]:
        has = {True: "yes", False: "NO: rebuild with TORCH_CUDA_ARCH_LIST=" + gpu["capability"], None: "unknown"}
        verdict = has[gpu["extension_has_code"]]
        if not info["extension"] or info["extension_cuda_arch_list"] is None:
            verdict = "no, the build has no CUDA kernels: the ops run their PyTorch references on it"
        print(f"gpu {gpu['index']}: {gpu['name']}, compute capability {gpu['capability']}, extension has code for it: "
              f"{verdict}")  # fmt: skip


def cmd_import_official(args) -> None:
    from taste.official import import_official

    for part, path in import_official(args.checkpoint, args.output, args.parts).items():
        print(f"{part}: {path}")


def register(sub) -> None:
    """Adds ``vocode``, ``info``, ``import-official``."""
    vo = sub.add_parser("vocode", help="S3 units -> 22.05 kHz wavs with the flow-matching decoder + HiFT vocoder")
    vo.add_argument("units", help="JSONL, a row per utterance: 'units' (S3 ids), optional 'id' and 'speaker' "
                    "(its CAM++ vector)")  # fmt: skip
    vo.add_argument("--voice", required=True, help="the release (cosyvoice/voice_generator.pth), that file, a "
                    "CosyVoice model directory (flow.pt + hift.pt) or a VoiceGenerator.save_pretrained "
                    "directory")  # fmt: skip
    vo.add_argument("-o", "--output", required=True, help="directory: one <id>.wav per row")
    vo.add_argument("--speaker", default=None, help="a .json list, .npy, .pt or .safetensors vector, or a .wav "
                    "reference (its CAM++ vector), for rows without one (default: zeros)")  # fmt: skip
    vo.add_argument("--speaker-model", default=None, help="the CAM++ ONNX file (or a directory holding one) for a "
                    ".wav --speaker; default: the one in --voice's directory")  # fmt: skip
    vo.add_argument("--batch-size", type=int, default=8)
    vo.add_argument("--seed", type=int, default=0)
    vo.add_argument("--device", default=None)
    vo.set_defaults(func=cmd_vocode)

    inf = sub.add_parser("info", help="versions, the compiled extension, GPUs and optional pieces (for bug reports)")
    inf.add_argument("--json", action="store_true", help="print JSON")
    inf.set_defaults(func=cmd_info)

    io = sub.add_parser("import-official", help="the released TASTE / TASLM checkpoint -> save_pretrained directories")
    io.add_argument("checkpoint", help="a local copy of MediaTek-Research/Llama-1B-TASTE-V0")
    io.add_argument("-o", "--output", required=True, help="writes OUTPUT/<part> for each part")
    io.add_argument("--parts", nargs="+", default=["tokenizer", "unit_decoder", "spoken_lm"],
                    choices=("tokenizer", "unit_decoder", "spoken_lm", "voice", "speaker", "s3_tokenizer"),
                    help="voice: cosyvoice/voice_generator.pth (S3 units -> speech); speaker: "
                    "cosyvoice/speaker_embed.onnx (CAM++ speaker vectors); s3_tokenizer: "
                    "cosyvoice/speech_tokenizer_v1.onnx; when the directory has them")  # fmt: skip
    io.set_defaults(func=cmd_import_official)
