"""Writes tests/data/voice_reference.safetensors and voice_generator_keys.json from the OFFICIAL code, for
tests/test_voice.py: the official ``VoiceGenerator``'s state-dict names and shapes, and its mel and waveform for
one utterance with weights made by ``test_voice.official_like_state`` (seed 1234) and the global generator seeded
99 before the flow runs.

    python tests/data/make_voice_reference.py path/to/TASTE-SpokenLM [path/with/omegaconf,diffusers,conformer,einops]

The official package imports torchaudio, lightning and onnx-side modules that the voice generator does not use;
they are stubbed here. Run with the environment this package is installed in (its torch draws the same numbers).
"""

import importlib
import importlib.machinery
import json
import os
import sys
import types
import warnings

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))


def official_voice_generator(repo: str, deps: str | None):
    sys.path.insert(0, os.path.join(repo, "taste_speech"))
    if deps:
        sys.path.append(deps)
    for name in ("torchaudio", "lightning", "lightning.pytorch", "lightning.pytorch.utilities"):
        stub = types.ModuleType(name)
        stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules.setdefault(name, stub)
    sys.modules["lightning.pytorch.utilities"].rank_zero_only = lambda f: f
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("modules_taste.inference_audio").VoiceGenerator().eval()


def main(repo: str, deps: str | None = None) -> None:
    sys.path.insert(0, os.path.dirname(HERE))
    from test_voice import REFERENCE_SEEDS, official_like_state

    torch.set_grad_enabled(False)
    model = official_voice_generator(repo, deps)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    with open(os.path.join(HERE, "voice_generator_keys.json"), "w") as f:  # (a tensor a line)
        f.write("{\n" + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(shapes.items())) + "\n}\n")
    model.load_state_dict(official_like_state(shapes, REFERENCE_SEEDS["weights"]), strict=True)
    n = REFERENCE_SEEDS["units"]
    units = torch.randint(0, 4096, (1, n), generator=torch.Generator().manual_seed(5))
    speaker = torch.randn(1, 192, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(REFERENCE_SEEDS["noise"])
    none, zero = torch.zeros(1, 0, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    mel = model.flow.inference(token=units.int(), token_len=torch.tensor([n], dtype=torch.int32), embedding=speaker,
                               prompt_token=none, prompt_token_len=zero, prompt_feat=torch.zeros(1, 0, 80),
                               prompt_feat_len=zero)  # fmt: skip
    wave = model.hift.inference(mel=mel)
    save_file({"units": units, "speaker": speaker, "mel": mel.contiguous(), "wave": wave.contiguous()},
              os.path.join(HERE, "voice_reference.safetensors"))  # fmt: skip
    print(f"{len(shapes)} tensors; mel {tuple(mel.shape)}, wave {tuple(wave.shape)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
