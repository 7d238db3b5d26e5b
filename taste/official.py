"""The released TASTE / TASLM checkpoint (``MediaTek-Research/Llama-1B-TASTE-V0``, the layout of the official
``TasteForCausalLM``) from a local directory, as this package's three models.

The directory holds ``model.safetensors``, or shards listed by ``model.safetensors.index.json`` (the
``pytorch_model.bin`` equivalents are read too). Its state dict has three parts (``shared/spec/TASTE.md``, key list
in ``official_state_dict.json``); each maps onto one model of this package by a renaming:

- ``audio_tower.audio_joint_encoder_segmenter.audio_encoder.encoder.*`` -> ``TasteTokenizer.encoder.*`` (Whisper's
  encoder, transformers' names), ``audio_tower.audio_joint_encoder_segmenter.audio_segmenter.decoder.*`` ->
  ``TasteTokenizer.aggregator.*``, ``audio_tower.vq.rvq.*`` -> ``TasteTokenizer.quantizer.*`` (the
  vector-quantize-pytorch layout, converted by :class:`taste.ResidualVQ`; its unused ``mlps`` are dropped);
- ``speech_decoder.*`` -> :class:`taste.UnitDecoder`;
- ``spoken_lm.*`` (+ the RVQ) -> :class:`taste.TasteSpokenLM` (peft's names under ``language_model``; a separate
  ``lm_head.weight`` is accepted for the tied Llama-3.2-1B).

Only the tensors of the parts asked for are read (safetensors reads them lazily). Shapes come from this package's
presets of the released model (``TasteConfig.official()``, ``UnitDecoderConfig.official()``,
``SpokenLMConfig.llama_3_2_1b()``) unless configs are given; a tensor whose shape differs, or a weight the files
lack, raises. The models come back in eval mode (``.train()`` for fine-tuning), as transformers' do. ``taste
import-official DIR -o OUT`` writes the three ``save_pretrained`` directories that the other commands take.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import torch
from torch import Tensor

from taste.checkpoint import read_tensors

ENCODER_PREFIX = "audio_tower.audio_joint_encoder_segmenter.audio_encoder.encoder."
# The tokenizer's parts: official prefix -> this package's (the RVQ and aggregator prefixes are their modules').
TOKENIZER_PREFIXES = {
    ENCODER_PREFIX: "encoder.",
    "audio_tower.audio_joint_encoder_segmenter.audio_segmenter.decoder.": "aggregator.",
    "audio_tower.vq.rvq.": "quantizer.",
}
UNIT_DECODER_PREFIXES = ("speech_decoder.",)
SPOKEN_LM_PREFIXES = ("spoken_lm.", "audio_tower.vq.rvq.")
PARTS = ("tokenizer", "unit_decoder", "spoken_lm")  # the default: the model file's three
# Beside it, when asked for: cosyvoice/voice_generator.pth (taste.VoiceGenerator), cosyvoice/speaker_embed.onnx
# (taste.SpeakerEncoder, CAM++) and cosyvoice/speech_tokenizer_v1.onnx (taste.S3Tokenizer).
OPTIONAL_PARTS = ("voice", "speaker", "s3_tokenizer")


def _speaker_file(directory: str) -> tuple[str, str]:
    from taste.speaker import find_speaker_model

    return find_speaker_model(directory), "speaker_embed.onnx"


def _s3_file(directory: str) -> tuple[str, str]:
    from taste.s3_tokenizer import find_s3_tokenizer

    return find_s3_tokenizer(directory), "speech_tokenizer_v1.onnx"


ONNX_PARTS = {"speaker": _speaker_file, "s3_tokenizer": _s3_file}  # part -> (its file, its name in import-official)


class OfficialModels(NamedTuple):
    """The parts of a released checkpoint that were asked for (None for the others)."""

    tokenizer: object | None
    unit_decoder: object | None
    spoken_lm: object | None
    voice: object | None = None
    speaker: object | None = None
    s3_tokenizer: object | None = None


def checkpoint_files(directory: str) -> dict[str, list[str] | None]:
    """Weight files of a checkpoint directory: ``{path: keys in it}`` (None: every key of the file). Sharded
    checkpoints are read through their index."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"directory {directory!r} does not exist (a local copy of the released checkpoint)")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(directory, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: no 'weight_map' of tensor names to shard files")
            files: dict[str, list[str] | None] = {}
            for key, name in weight_map.items():
                files.setdefault(os.path.join(directory, name), []).append(key)
            missing = [p for p in files if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are not in the directory: {missing[:3]}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(directory, name)):
            return {os.path.join(directory, name): None}
    raise FileNotFoundError(
        f"{directory!r} has no model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
        "pytorch_model.bin.index.json: not a checkpoint directory"
    )


def read_official_tensors(directory: str, prefixes) -> dict[str, Tensor]:
    """The tensors of a checkpoint directory whose names start with one of ``prefixes``, on the CPU."""
    prefixes = tuple(prefixes)
    state: dict[str, Tensor] = {}
    for path, keys in checkpoint_files(directory).items():
        if keys is not None and not any(k.startswith(prefixes) for k in keys):
            continue
        state.update(read_tensors(path, lambda key: key.startswith(prefixes)))
    if not state:
        raise ValueError(f"{directory!r} has no tensors under {list(prefixes)}: not a TASTE / TASLM checkpoint")
    return state


def tokenizer_state(official: dict[str, Tensor]) -> dict[str, Tensor]:
    """The official tokenizer tensors renamed to :class:`taste.TasteTokenizer`'s state dict (the RVQ still in the
    vector-quantize-pytorch layout, which ResidualVQ's loading converts)."""
    out = {}
    for key, value in official.items():
        for prefix, own in TOKENIZER_PREFIXES.items():
            if key.startswith(prefix):
                out[own + key[len(prefix) :]] = value
    return out


def load_tokenizer(directory: str, *, config=None, device=None, dtype=None, state=None):
    """A :class:`taste.TasteTokenizer` with the released weights. ``config``: a :class:`taste.TasteConfig` (default
    ``TasteConfig.official()``); ``dtype`` casts the encoder and aggregator (released in bfloat16; the quantizer
    stays float32). ``state``: the official tensors, already read."""
    from taste.tokenizer import TasteConfig, TasteTokenizer

    if state is None:
        state = read_official_tensors(directory, TOKENIZER_PREFIXES)
    model = TasteTokenizer.from_state_dict(config or TasteConfig.official(), tokenizer_state(state), device=device,
                                           dtype=dtype)  # fmt: skip
    _check_materialised(model, state)
    return model.eval()


def load_unit_decoder(directory: str, *, config=None, device=None, state=None):
    """A :class:`taste.UnitDecoder` with the released weights (``config`` default ``UnitDecoderConfig.official()``)."""
    from taste.unit_decoder import UnitDecoder, UnitDecoderConfig

    if state is None:
        state = read_official_tensors(directory, UNIT_DECODER_PREFIXES)
    with torch.device("meta"):
        model = UnitDecoder(config=config or UnitDecoderConfig.official())
    model.load_official_state_dict(state, strict=True, assign=True)
    _check_materialised(model, state)
    return model.float().to(device).eval()


def load_spoken_lm(directory: str, *, config=None, device=None, state=None):
    """A :class:`taste.TasteSpokenLM` with the released weights: the Llama-3.2-1B backbone, its LoRA adapters (not
    merged; ``merge_lora()`` folds them in), the bridges, the head and the RVQ codebooks. ``config`` default
    ``SpokenLMConfig.llama_3_2_1b()``; the backbone's weights come from the checkpoint, not from
    ``backbone_path``."""
    from taste.spoken_lm import SpokenLMConfig, TasteSpokenLM

    if state is None:
        state = read_official_tensors(directory, SPOKEN_LM_PREFIXES)
    # Built on the meta device and given the checkpoint's tensors: no random initialisation of 1.2B weights first
    # (16 s on 2 cores). The rotary tables, buffers that no checkpoint holds, are built again on the CPU.
    with torch.device("meta"):
        model = TasteSpokenLM(config=config or SpokenLMConfig.llama_3_2_1b())
    model.load_official_state_dict(state, strict=True, assign=True)
    if not _meta_state(state):
        model._materialise("taste.official: tensors the checkpoint does not hold and that could not be built")
    return model.float().to(device).eval()


def _meta_state(state: dict) -> bool:
    """Whether the given tensors are meta tensors (the tests' strict loads of the released key list), not weights."""
    return any(t.is_meta for t in state.values())


def _check_materialised(model, state: dict) -> None:
    """After loading real weights into a model built on the meta device, no meta tensor may be left."""
    if _meta_state(state):
        return
    from taste.checkpoint import meta_tensors

    left = meta_tensors(model)
    if left:
        raise RuntimeError(f"taste.official: tensors the checkpoint does not hold and that could not be built: {left}")


def load_official(directory: str, parts=PARTS, *, device=None, dtype=None) -> OfficialModels:
    """The ``parts`` (names from :data:`PARTS` and :data:`OPTIONAL_PARTS`) of a released checkpoint directory, with
    the released shapes, on ``device``. ``dtype`` casts the tokenizer's encoder and aggregator (see
    :func:`load_tokenizer`); the unit decoder, the spoken LM and the voice generator hold float32 weights (run them
    under autocast for bfloat16)."""
    unknown = set(parts) - set(PARTS + OPTIONAL_PARTS)
    if unknown:
        raise ValueError(f"parts must be among {PARTS + OPTIONAL_PARTS}, got {sorted(unknown)}")
    if "voice" in parts:
        from taste.voice import VoiceGenerator

        voice = VoiceGenerator.from_official(directory, device=device)
    if "speaker" in parts:
        from taste.speaker import SpeakerEncoder

        speaker = SpeakerEncoder.from_official(directory, device=device)
    if "s3_tokenizer" in parts:
        from taste.s3_tokenizer import S3Tokenizer

        s3_tokenizer = S3Tokenizer.from_official(directory, device=device)
    return OfficialModels(
        load_tokenizer(directory, device=device, dtype=dtype) if "tokenizer" in parts else None,
        load_unit_decoder(directory, device=device) if "unit_decoder" in parts else None,
        load_spoken_lm(directory, device=device) if "spoken_lm" in parts else None,
        voice if "voice" in parts else None,
        speaker if "speaker" in parts else None,
        s3_tokenizer if "s3_tokenizer" in parts else None,
    )


def import_official(directory: str, out_dir: str, parts=PARTS) -> dict[str, str]:
    """Writes each part of a released checkpoint as a ``save_pretrained`` directory ``out_dir/<part>``, one part at
    a time (so that only one is in memory), and returns their paths by part. The speaker encoder and the S3
    tokenizer, ONNX graphs, are copied as they are (``out_dir/speaker/speaker_embed.onnx``,
    ``out_dir/s3_tokenizer/speech_tokenizer_v1.onnx``)."""
    written = {}
    for part in parts:
        if part in ONNX_PARTS:  # ONNX graphs: copied as they are, once they load
            import shutil

            getattr(load_official(directory, (part,)), part)  # a file that does not load raises here
            source, name = ONNX_PARTS[part](directory)
            os.makedirs(os.path.join(out_dir, part), exist_ok=True)
            written[part] = shutil.copyfile(source, os.path.join(out_dir, part, name))
            continue
        model = getattr(load_official(directory, (part,)), part)
        path = os.path.join(out_dir, part)
        model.save_pretrained(path)
        written[part] = path
        del model
    return written
