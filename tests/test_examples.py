"""The example scripts' configs: every JSON is a valid training config, every script parses, and the official
recipe's stage-1 pipeline (examples/stage1_whisper) runs its configs end to end on a tiny random Whisper."""

import glob
import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import tiny_whisper_dir

import taste
from taste import cli, corpus
from taste.train import TrainConfig

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.parametrize(
    "path", sorted(glob.glob(os.path.join(EXAMPLES, "*", "*.json"))), ids=lambda p: os.path.relpath(p, EXAMPLES)
)
def test_every_example_config_is_valid(path):
    """(Before: nothing read them but the scripts, hours in.)"""
    from taste.train_lm import LMTrainConfig

    with open(path) as f:
        raw = json.load(f)
    config = (LMTrainConfig if "codes" in raw else TrainConfig).from_json(path)
    for key in ("init_from", "tokenizer"):  # other runs of the same example, or its own directories
        value = getattr(config, key, None)
        if value and not value.startswith("runs/"):
            assert value.startswith("../") or os.path.exists(os.path.join(os.path.dirname(path), value)), value


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(EXAMPLES, "**", "*.sh"), recursive=True)),
                         ids=lambda p: os.path.relpath(p, EXAMPLES))  # fmt: skip
def test_every_example_script_parses_and_names_configs_that_exist(path):
    assert subprocess.run(["bash", "-n", path], capture_output=True).returncode == 0
    folder, text = os.path.dirname(path), open(path).read()
    for name in ("text", "no_vq", "vq", "asr", "lm"):
        if f'"{name}.json"' in text or f" {name}.json" in text:
            assert os.path.isfile(os.path.join(folder, f"{name}.json")), name


@pytest.mark.filterwarnings("ignore:taste. ResidualVQ stages")  # (2 vq steps: dropout leaves a stage unrun)
def test_the_official_recipe_runs_from_a_whisper_seed(tmp_path, monkeypatch, capsys):
    """examples/stage1_whisper's commands and configs, with `--set` scaling them down: a local Whisper (random, tiny)
    -> `taste init-tokenizer --whisper` -> stages text, no_vq and vq from that seed -> eval-tokenizer."""
    tiny_whisper_dir(tmp_path / "whisper", vocab_size=51865, seed=0, frames=100)
    g = torch.Generator().manual_seed(0)
    rows = []
    os.makedirs(tmp_path / "data" / "wavs")
    for i in range(10):  # noise of 0.5 to 1.5 s (the window: 2 s) with random units
        seconds = 0.5 + (i % 5) * 0.25
        corpus.write_wav(
            str(tmp_path / "data" / "wavs" / f"u{i}.wav"), 0.1 * torch.randn(int(16000 * seconds), generator=g)
        )
        units = torch.randint(0, 12, (int(seconds * 50),), generator=g).tolist()
        rows.append({"id": f"u{i}", "path": f"wavs/u{i}.wav", "text": corpus.SENTENCES[i][:25].strip(), "units": units})
    manifest = tmp_path / "data" / "manifest.units.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = os.path.join(EXAMPLES, "stage1_whisper")
    for name in ("text.json", "no_vq.json", "vq.json"):
        shutil.copy(os.path.join(recipe, name), tmp_path)
    monkeypatch.chdir(tmp_path)
    script = open(os.path.join(recipe, "run.sh")).read()
    assert 'taste init-tokenizer runs/seed --whisper "$whisper"' in script
    assert cli.main(["init-tokenizer", "runs/seed", "--whisper", str(tmp_path / "whisper"), "--value-layer", "1"]) == 0
    small = ["preset=tiny", "steps=2", "batch_size=4", "accum=1", "eval_size=3", "save_every=2", "warmup=1"]
    assert 'taste train-tokenizer "$stage.json" --set manifest="$manifest"' in script
    for stage in ("text", "no_vq", "vq"):
        argv = ["train-tokenizer", f"{stage}.json", "--set", f"manifest={manifest}", "--quiet"]
        assert cli.main(argv + [x for s in small for x in ("--set", s)]) == 0, capsys.readouterr().err
    model = taste.train.Stage1Model.from_pretrained("runs/vq")
    assert model.tokenizer.config.aggregator.prefix_ids == (50258, 50259, 50359, 50363)  # (a 51865-id Whisper)
    assert model.tokenizer.config.freeze_encoder and bool(model.tokenizer.quantizer.initted.any())
    assert cli.main(["eval-tokenizer", "runs/vq", str(manifest), "--eval-size", "3"]) == 0
    assert '"stage": "vq"' in capsys.readouterr().out
    # --set's own errors
    assert cli.main(["train-tokenizer", "vq.json", "--set", "steps"]) == 1
    assert "--set takes KEY=VALUE, got 'steps'" in capsys.readouterr().err
    assert cli.main(["train-tokenizer", "vq.json", "--set", "step=5"]) == 1
    assert "unknown training options ['step'] among the overrides" in capsys.readouterr().err
    assert cli.main(["train-tokenizer", "vq.json", "--set", "steps=five"]) == 1
    assert "steps must be int, got 'five'" in capsys.readouterr().err
