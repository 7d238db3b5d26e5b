"""Helpers the ``taste`` subcommands share: argument parsing pieces, loaders, vector files."""

from __future__ import annotations

import argparse
import json
import os


def _dtype(name: str):
    """A --dtype choice as the torch dtype to cast to (None: float32, the models' own)."""
    import torch

    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _report(metrics: dict, json_path: str | None) -> None:
    print(json.dumps(metrics, indent=2))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(metrics, f, indent=2)


def _read_centroids(path: str):
    """The ``centroids`` tensor of a ``taste units`` output file."""
    from taste.checkpoint import read_tensors

    tensors = read_tensors(path)
    if "centroids" not in tensors:
        raise ValueError(f"{path} holds no 'centroids' tensor (got {sorted(tensors)[:5]}): not a `taste units` file")
    return tensors["centroids"]


def _load_asr(path: str, device: str, dtype, encoder: bool = False):
    """A WhisperTranscriber from a local Whisper checkpoint directory."""
    from taste.asr import WhisperTranscriber

    return WhisperTranscriber.from_whisper(path, encoder=encoder, device=device, dtype=dtype).eval()


def _load_lm(path: str, device: str):
    from taste.spoken_lm import TasteSpokenLM

    return TasteSpokenLM.from_pretrained(path, device=device).eval()


def _generation_config(args):
    from taste.generate import GenerationConfig

    top_p = 0.0 if args.greedy else args.top_p
    return GenerationConfig(extra_words=args.extra_words, text_top_p=top_p, text_temperature=args.temperature,
                            repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                            stop_id=args.stop_id, instruct_prefix_ids=args.instruct_prefix,
                            instruct_suffix_ids=args.instruct_suffix or (),
                            official_sampling=args.official_sampling)  # fmt: skip


def _token_ids(text: str) -> tuple[int, ...]:
    """``"128000,128006, 882"`` -> ``(128000, 128006, 882)``; ``""`` -> ``()``."""
    try:
        return tuple(int(t) for t in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token ids separated by commas, got {text!r}") from None


def _load_voice(path: str, device: str):
    """A VoiceGenerator from its save_pretrained directory or from the official / CosyVoice files."""
    from taste.checkpoint import saved_model_kind
    from taste.voice import VoiceGenerator

    if saved_model_kind(path) == "VoiceGenerator":
        return VoiceGenerator.from_pretrained(path, device=device)
    return VoiceGenerator.from_official(path, device=device)


def _speaker_encoder(explicit: str | None, *candidates: str | None):
    """The CAM++ speaker encoder at ``explicit`` (which must hold one), else the first of ``candidates`` (release or
    import-official directories) that holds one, else None."""
    from taste.speaker import SpeakerEncoder, find_speaker_model

    if explicit:
        return SpeakerEncoder.from_official(explicit)
    for path in candidates:
        if path and os.path.isdir(path) and find_speaker_model(path):
            return SpeakerEncoder.from_official(path)
    return None


def _speaker_vector(path: str, encoder):
    """A speaker vector: a vector file (see _read_vector), or a .wav reference whose CAM++ vector ``encoder`` makes."""
    if not path.endswith(".wav"):
        return _read_vector(path)
    if encoder is None:
        raise ValueError(f"--speaker {path} is audio: give --speaker-model (the release, or its "
                         "cosyvoice/speaker_embed.onnx) to make its CAM++ vector")  # fmt: skip
    from taste.corpus import read_wav

    audio, rate = read_wav(path)
    return encoder.speaker([audio], rate)


def _write_vector(path: str, value) -> None:
    """Writes a 1-D vector as _read_vector reads it back: .json (a list), .npy, or .safetensors / .pt ('speaker')."""
    import numpy as np
    import torch

    value = value.detach().float().cpu().contiguous()
    if path.endswith(".json"):
        with open(path, "w") as f:
            json.dump(value.tolist(), f)
            f.write("\n")
    elif path.endswith(".npy"):
        np.save(path, value.numpy())
    elif path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({"speaker": value}, path)
    elif path.endswith(".pt"):
        torch.save({"speaker": value}, path)
    else:
        raise ValueError(f"-o {path}: write a .json, .npy, .safetensors or .pt file")


def _read_vector(path: str):
    """A 1-D float vector from a .json list, .npy, or a .pt / .safetensors file holding one tensor."""
    import numpy as np
    import torch

    from taste.checkpoint import parse_json, read_tensors

    if path.endswith(".json"):
        with open(path) as f:
            value = torch.tensor(parse_json(f.read(), path), dtype=torch.float32)
    elif path.endswith(".npy"):
        value = torch.from_numpy(np.load(path)).float()
    else:
        tensors = read_tensors(path)
        if len(tensors) != 1:
            raise ValueError(f"{path} must hold one tensor (the speaker vector), got {sorted(tensors)[:5]}")
        value = next(iter(tensors.values())).float()
    return value.reshape(-1)


def _overrides(args) -> dict:
    """The config options that ``--out-dir`` and each ``--set KEY=VALUE`` replace (VALUE as JSON where it parses:
    ``steps=500``, ``bf16=false``; else the string itself: ``manifest=data/m.jsonl``)."""
    out = {"out_dir": args.out_dir} if args.out_dir else {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _add_training(sub, name: str, help: str, config_class: str, func) -> None:
    t = sub.add_parser(name, help=help)
    t.add_argument("config", help=f"JSON with the fields of {config_class}")
    t.add_argument("--out-dir", default=None, help="override the config's out_dir")
    one = "override one option of the config (VALUE as JSON where it parses: steps=500); repeatable"
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=one)
    t.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (resume later)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=func)


def _add_eval_options(p) -> None:
    p.add_argument("--eval-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the metrics here")


def _add_sampling(p) -> None:
    p.add_argument("--extra-words", type=int, default=8, help="words to generate before a sentence end may stop")
    p.add_argument("--top-p", type=float, default=0.3)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--stop-id", type=int, default=None, help="a token id that ends the text where it is drawn")
    p.add_argument("--instruct-prefix", type=_token_ids, default=None, metavar="IDS",
                   help="the official instruct mode: token ids (comma-separated) fed before the prompt, e.g. the "
                   "chat template's user header")  # fmt: skip
    p.add_argument("--instruct-suffix", type=_token_ids, default=None, metavar="IDS",
                   help="with --instruct-prefix: token ids fed after the prompt (e.g. <|eot_id|> and the assistant "
                   "header)")  # fmt: skip
    official = "the official sampler's choices: the first token from every allowed id, special tokens allowed, a text "
    p.add_argument("--official-sampling", action="store_true", help=official + "prompt's plain rows without BOS")
    p.add_argument("--greedy", action="store_true", help="greedy text (top-p 0)")
    p.add_argument("--seed", type=int, default=0)
