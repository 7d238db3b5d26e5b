import pytest
import torch

from taste.encoder import EncoderConfig, SpeechEncoder, sinusoids

transformers = pytest.importorskip("transformers")
from transformers.models.whisper.modeling_whisper import WhisperEncoder  # noqa: E402


def hf_encoder(layers=3, frames=100, seed=0):
    config = transformers.WhisperConfig(
        num_mel_bins=80, d_model=64, encoder_layers=layers, encoder_attention_heads=2, encoder_ffn_dim=96,
        max_source_positions=frames,
    )  # fmt: skip
    torch.manual_seed(seed)
    return WhisperEncoder(config).double().eval()


@pytest.mark.parametrize("value_layer", [0, 1, 2])  # HF's hidden_states[-1] is after the final LayerNorm
def test_matches_transformers_whisper_encoder(value_layer):
    hf = hf_encoder()
    ours = SpeechEncoder.from_whisper_encoder(hf, value_layer=value_layer)
    assert ours.config.frames == 100 and ours.config.window_seconds == 2.0
    mel = torch.randn(3, 80, 200, dtype=torch.float64)
    ref = hf(mel, output_hidden_states=True)
    h_key, h_val = ours(mel)
    torch.testing.assert_close(h_key, ref.last_hidden_state, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h_val, ref.hidden_states[value_layer], atol=1e-12, rtol=1e-12)


def test_truncated_to_the_key_layer():
    hf = hf_encoder(layers=4)
    ours = SpeechEncoder.from_whisper_encoder(hf, value_layer=1, num_layers=2)
    assert len(ours.layers) == 2
    mel = torch.randn(2, 80, 200, dtype=torch.float64)
    ref = hf(mel, output_hidden_states=True)
    h_key, h_val = ours(mel)
    torch.testing.assert_close(h_val, ref.hidden_states[1], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h_key, hf.layer_norm(ref.hidden_states[2]), atol=1e-12, rtol=1e-12)


def test_random_init_has_whispers_positions_and_gradients():
    enc = SpeechEncoder(config=EncoderConfig(n_mels=80, window_seconds=1.0, d_model=32, num_layers=2, num_heads=2,
                                             ffn_dim=64, value_layer=1))  # fmt: skip
    torch.testing.assert_close(enc.embed_positions.weight, sinusoids(50, 32))
    assert not enc.embed_positions.weight.requires_grad
    h_key, h_val = enc(torch.randn(2, 80, 100))
    (h_key.sum() + h_val.sum()).backward()
    assert enc.layers[0].fc1.weight.grad is not None and enc.conv1.weight.grad is not None


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="value_layer must be in"):
        SpeechEncoder(config=EncoderConfig(num_layers=2, value_layer=3, d_model=32, num_heads=2))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        SpeechEncoder(config=EncoderConfig(num_layers=1, value_layer=1, d_model=30, num_heads=4))
    enc = SpeechEncoder(config=EncoderConfig(n_mels=80, window_seconds=1.0, d_model=32, num_layers=1, num_heads=2,
                                             ffn_dim=64, value_layer=1))  # fmt: skip
    with pytest.raises(ValueError, match=r"mel must be \(B, 80, 100\)"):
        enc(torch.randn(1, 80, 120))


def test_peft_adapters_inject_into_the_encoder():
    """peft reads ``model.config`` when it injects adapters (as a dict: peft 0.13, the oldest supported, calls its
    ``.get``); our configs give ``to_dict``. LoRA with non-zero B changes the encoder's output and trains only the
    adapters."""
    import copy

    import pytest

    peft = pytest.importorskip("peft")
    enc = SpeechEncoder(config=EncoderConfig(n_mels=80, window_seconds=1.0, d_model=32, num_layers=2, num_heads=2,
                                             ffn_dim=64, value_layer=1))  # fmt: skip
    assert EncoderConfig(**enc.config.to_dict()) == enc.config
    mel = torch.randn(2, 80, 100)
    before = enc(mel)
    tuned = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False), copy.deepcopy(enc))  # fmt: skip
    after = tuned(mel)
    assert not torch.allclose(after[0], before[0])
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
