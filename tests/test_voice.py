"""The flow-matching decoder and HiFT vocoder (taste.voice) against the official code's own output, and the batched
path against one utterance at a time."""

import json
import math
import os

import pytest
import torch
from test_unit_decoder import espnet_rel_attention

from taste.relpos import RelPosEncoder, RelPositionAttention, relative_sinusoids
from taste.voice import VoiceGenerator, VoiceGeneratorConfig, fold_weight_norm
from taste.voice_flow import masked_group_norm

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
REFERENCE_SEEDS = {"weights": 1234, "units": 37, "noise": 99}  # (tests/data/make_voice_reference.py reads these)


def official_like_state(shapes: dict, seed: int) -> dict:
    """Random weights in the official layout, made by name in sorted order (the same on any machine): norm scales,
    Snake alphas and weight-norm magnitudes near 1, biases near 0, matrices scaled by 1/sqrt(fan-in)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        r = torch.randn(shape, generator=g)
        if name.endswith((".alpha", ".weight_g")) or (name.endswith("weight") and len(shape) == 1):
            out[name] = 1 + 0.1 * r
        elif len(shape) == 1:
            out[name] = 0.02 * r
        else:
            out[name] = r / math.prod(shape[1:]) ** 0.5
    return out


def official_shapes() -> dict:
    with open(os.path.join(DATA, "voice_generator_keys.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reference():
    from safetensors.torch import load_file

    return load_file(os.path.join(DATA, "voice_reference.safetensors"))


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    model = VoiceGenerator(config=VoiceGeneratorConfig.tiny(**overrides)).eval()
    with torch.no_grad():  # (default inits leave GroupNorm/LayerNorm at 1/0 and Snake at 1: shake them)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_matches_the_official_code(reference):
    """Weights in the official layout (weight-normalised vocoder), the official file's names and shapes, one
    utterance with the official code's random draws: the same mel and waveform the official code wrote."""
    state = official_like_state(official_shapes(), REFERENCE_SEEDS["weights"])
    model = VoiceGenerator().eval()
    model.load_official_state_dict(state)
    units, speaker = reference["units"], reference["speaker"]
    lengths = torch.tensor([units.shape[1]])
    noise = model.draw_noise(units, lengths, torch.Generator().manual_seed(REFERENCE_SEEDS["noise"]))
    mel, frames = model.mel(units, lengths, speaker, noise=noise)
    assert mel.shape == reference["mel"].shape and frames.tolist() == [reference["mel"].shape[-1]]
    torch.testing.assert_close(mel, reference["mel"], atol=1e-4, rtol=1e-4)
    wave = model(units, lengths, speaker, noise=noise)
    assert wave.shape == reference["wave"].shape
    torch.testing.assert_close(wave, reference["wave"], atol=1e-4, rtol=1e-4)


def test_batch_gives_each_utterance_what_it_gives_alone():
    model = tiny()
    g = torch.Generator().manual_seed(1)
    units = [torch.randint(0, 256, (n,), generator=g) for n in (37, 12, 1, 26)]  # (odd and even mel lengths)
    speaker = torch.randn(4, 16, generator=g)
    batched = model.generate(units, speaker, generator=torch.Generator().manual_seed(3))
    again = torch.Generator().manual_seed(3)
    alone = [model.generate([u], speaker[i], generator=again)[0] for i, u in enumerate(units)]
    for i, (a, b) in enumerate(zip(batched, alone)):
        assert a.shape == b.shape == (model.config.mel_frames(torch.tensor(len(units[i]))) * 256,)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and a padded batch's mel rows are those of each utterance alone (no leak from padding)
    lengths = torch.tensor([len(u) for u in units])
    padded = torch.nn.utils.rnn.pad_sequence(units, batch_first=True, padding_value=255)
    noise = model.draw_noise(units, lengths, torch.Generator().manual_seed(4))
    mel, frames = model.mel(padded, lengths, speaker, noise=noise)
    for i in range(4):
        one = tuple([n[i]] for n in noise)
        mel_i, _ = model.mel(units[i][None], lengths[i : i + 1], speaker[i : i + 1], noise=one)
        torch.testing.assert_close(mel[i, :, : frames[i]], mel_i[0], atol=1e-5, rtol=1e-5)
        assert not mel[i, :, frames[i] :].any()


def test_guidance_in_one_call_or_two():
    model = tiny()
    units = [torch.arange(30) % 256, torch.arange(9)]
    one = model.generate(units, generator=torch.Generator().manual_seed(2))
    model.flow.batch_guidance = False  # (the official code's two estimator calls per step)
    two = model.generate(units, generator=torch.Generator().manual_seed(2))
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    model.config = model.flow.config = model.hift.config = VoiceGeneratorConfig.tiny(cfg_rate=0.0)
    assert not torch.allclose(model.generate(units[:1], generator=torch.Generator().manual_seed(2))[0], one[0])


def test_seeded_runs_repeat_and_seeds_differ():
    model = tiny()
    units = [torch.arange(20) % 256]
    a = model.generate(units, generator=torch.Generator().manual_seed(0))[0]
    b = model.generate(units, generator=torch.Generator().manual_seed(0))[0]
    c = model.generate(units, generator=torch.Generator().manual_seed(1))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= model.config.audio_limit


def test_flow_and_vocoder_compile_fullgraph():
    """torch.compile(fullgraph=True) of the flow decoder (encoder, regulator, every Euler step) and of the vocoder:
    no graph break, the eager numbers (2 Euler steps: the loop unrolls into the graph)."""
    model = tiny(steps=2)
    units = [torch.arange(23) % 256, torch.arange(11)]
    lengths = torch.tensor([23, 11])
    padded = torch.nn.utils.rnn.pad_sequence(units, batch_first=True)
    speaker = torch.randn(2, 16)
    noise = model.draw_noise(units, lengths, torch.Generator().manual_seed(0))
    z = torch.stack([torch.nn.functional.pad(n, (0, noise[0][0].shape[1] - n.shape[1])) for n in noise[0]])
    torch._dynamo.reset()
    with torch.no_grad():
        mel, mask = model.flow(padded, lengths, speaker, z)
        mel_c, mask_c = torch.compile(model.flow, fullgraph=True, backend="aot_eager")(padded, lengths, speaker, z)
        torch.testing.assert_close(mel_c, mel, atol=1e-5, rtol=1e-5)
        assert torch.equal(mask_c, mask)
        wave = model.hift(mel, mask, noise[1], noise[2])
        wave_c = torch.compile(model.hift, fullgraph=True, backend="aot_eager")(mel, mask, noise[1], noise[2])
        torch.testing.assert_close(wave_c, wave, atol=1e-5, rtol=1e-5)


def test_non_causal_relative_attention_matches_espnet():
    """The flow's token encoder: every query over every unpadded key, offsets -(T-1)..T-1 (ESPnet's rel_shift)."""
    torch.manual_seed(0)
    attn = RelPositionAttention(32, 4).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    lengths = torch.tensor([7, 4])
    mask = (torch.arange(7) < lengths[:, None])[:, None, :].expand(-1, 7, -1)
    positions = torch.arange(7).expand(2, -1) + 6
    table = relative_sinusoids(13, 32, dtype=torch.float64, first=-6)
    k, v = attn.project_kv(x)
    ours = attn.attend(x, k, v, mask, positions, attn.project_positions(table))
    torch.testing.assert_close(ours, espnet_rel_attention(attn, x, mask), atol=1e-12, rtol=1e-12)
    # the encoder: a padded row's valid outputs are those of the row alone
    enc = RelPosEncoder(8, 32, 2, 4, 64, activation="swish", conformer=True, input_relu=False, dropout=0.0,
                        pos_dropout=0.0, attn_dropout=0.0, causal=False).double().eval()  # fmt: skip
    h = torch.randn(2, 7, 8, dtype=torch.float64)
    both = enc(h, lengths)
    torch.testing.assert_close(both[1, :4], enc(h[1:, :4], lengths[1:])[0], atol=1e-12, rtol=1e-12)
    assert not torch.allclose(both[0, :3], enc(h[:1, :3], torch.tensor([3]))[0])  # (not causal: later keys count)


def test_masked_group_norm_is_group_norm_of_the_valid_frames():
    norm = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 8, 10)
    mask = (torch.arange(10) < torch.tensor([10, 6])[:, None]).float()[:, None]
    y = masked_group_norm(x, mask, norm)
    torch.testing.assert_close(y[0], norm(x[:1])[0])
    torch.testing.assert_close(y[1, :, :6], norm(x[1:, :, :6])[0])


def test_stft_and_istft_match_torch_per_row():
    model = tiny()
    hift, c = model.hift, model.config
    samples = torch.tensor([256 * 5, 256 * 3])
    s = torch.randn(2, 256 * 5) * (torch.arange(256 * 5) < samples[:, None])
    spec = hift.stft(s, samples)
    for i in range(2):
        want = torch.stft(s[i, : samples[i]], c.n_fft, c.istft_hop, c.n_fft, window=hift.window, return_complex=True)
        want = torch.cat([want.real, want.imag])
        torch.testing.assert_close(spec[i, :, : want.shape[-1]], want, atol=1e-5, rtol=1e-5)
    frames = samples // c.istft_hop + 1
    mag, phase = torch.rand(2, 9, spec.shape[-1]) + 0.1, torch.rand(2, 9, spec.shape[-1]) * 6 - 3
    wave = hift.istft(mag, phase, frames)
    for i in range(2):
        f = int(frames[i])
        want = torch.istft(torch.polar(mag[i, :, :f], phase[i, :, :f]), c.n_fft, c.istft_hop, c.n_fft,
                           window=hift.window)  # fmt: skip
        torch.testing.assert_close(wave[i, : want.shape[0]], want, atol=1e-5, rtol=1e-5)


def test_weight_norm_folding_and_strict_loading():
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.ConvTranspose1d(4, 3, 5))
    state = {f"hift.x.{k}": v for k, v in conv.state_dict().items()}
    folded = fold_weight_norm(state)
    torch.testing.assert_close(folded["hift.x.weight"], conv.weight.detach())
    with pytest.raises(ValueError, match="both its magnitude and its direction"):
        fold_weight_norm({"a.weight_g": torch.ones(3, 1, 1)})
    shapes = official_shapes()
    model = VoiceGenerator()
    with torch.device("meta"):
        state = {k: torch.empty(v) for k, v in shapes.items()}
    assert len(fold_weight_norm(state)) == len(model.state_dict())
    del state["flow.encoder_proj.bias"]
    state["flow.extra"] = torch.empty(1)
    state["hift.conv_post.bias"] = torch.empty(5)
    with pytest.raises(ValueError, match=r"1 missing .*encoder_proj.bias.*1 unexpected .*flow.extra.*conv_post.bias"):
        model.load_official_state_dict(state)


def test_loading_from_files(tmp_path):
    model = tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "voice_generator.pth")
    loaded = VoiceGenerator.from_official(str(tmp_path / "voice_generator.pth"), config=model.config)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    release = tmp_path / "release"
    (release / "cosyvoice").mkdir(parents=True)
    torch.save(state, release / "cosyvoice" / "voice_generator.pth")
    assert VoiceGenerator.from_official(str(release), config=model.config).config == model.config
    cosy = tmp_path / "cosyvoice"
    cosy.mkdir()
    torch.save({k[5:]: v for k, v in state.items() if k.startswith("flow.")}, cosy / "flow.pt")
    with pytest.raises(FileNotFoundError, match="neither"):
        VoiceGenerator.from_official(str(cosy), config=model.config)
    torch.save({k[5:]: v for k, v in state.items() if k.startswith("hift.")}, cosy / "hift.pt")
    units = [torch.arange(9)]
    want = model.generate(units, generator=torch.Generator().manual_seed(0))[0]
    got = VoiceGenerator.from_official(str(cosy), config=model.config).generate(
        units, generator=torch.Generator().manual_seed(0))[0]  # fmt: skip
    torch.testing.assert_close(got, want)
    model.save_pretrained(str(tmp_path / "saved"))
    again = VoiceGenerator.from_pretrained(str(tmp_path / "saved"))
    torch.testing.assert_close(again.generate(units, generator=torch.Generator().manual_seed(0))[0], want)


def test_bad_input_is_named():
    model = tiny()
    with pytest.raises(ValueError, match=r"units\[1\] must be a non-empty 1-D"):
        model.generate([torch.arange(3), torch.arange(0)])
    with pytest.raises(ValueError, match="num_units"):
        model.generate([torch.tensor([1, 256])])
    with pytest.raises(ValueError, match=r"speaker must be \(1, 16\)"):
        model.generate([torch.arange(3)], torch.zeros(2, 16))
    with pytest.raises(ValueError, match="every length"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.tensor([4]), torch.zeros(1, 16))
    with pytest.raises(ValueError, match="mel_hop"):
        VoiceGeneratorConfig(upsample_rates=(8, 4))
    with pytest.raises(ValueError, match="groups"):
        VoiceGeneratorConfig(channels=(250, 256))
    assert model.generate([]) == []


def test_vocode_command(tmp_path, capsys):
    from taste.cli import main
    from taste.corpus import read_wav

    model = tiny()
    model.save_pretrained(str(tmp_path / "voice"))
    rows = [{"id": "a", "units": list(range(20))}, {"units": [5, 6, 7], "speaker": [0.5] * 16}]
    (tmp_path / "units.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    argv = ["vocode", str(tmp_path / "units.jsonl"), "--voice", str(tmp_path / "voice"), "-o", str(tmp_path / "out"),
            "--batch-size", "1"]  # fmt: skip
    assert main(argv) == 0
    wave, rate = read_wav(str(tmp_path / "out" / "a.wav"))
    assert rate == 22050 and wave.shape == (int(20 / 50 * 22050 / 256) * 256,)
    want = model.generate([torch.arange(20)], generator=torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(wave, want, atol=1 / 32767, rtol=0)  # (16-bit PCM)
    assert read_wav(str(tmp_path / "out" / "1.wav"))[0].shape == (int(3 / 50 * 22050 / 256) * 256,)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"units": [1, 2], "speaker": [0.0] * 3}) + "\n")
    assert main(["vocode", str(tmp_path / "bad.jsonl"), "--voice", str(tmp_path / "voice"), "-o", str(tmp_path)]) == 1
    assert "bad.jsonl:1: the speaker vector must have 16 values" in capsys.readouterr().err
