"""taste.official: the released checkpoint's layout (sharded safetensors, the official names) read into the three
models. Tiny models are written in that layout by an independent renaming here (the inverse of the loader's) and
read back; at the released shapes, the spec's key list must load strictly (on the meta device)."""

import dataclasses
import filecmp
import json
import os

import pytest
import torch
from conftest import OFFICIAL_STATE_DICT, official_keys

import taste
from taste import official

AUDIO = "audio_tower.audio_joint_encoder_segmenter."


def official_tokenizer_keys(model) -> dict:
    """TasteTokenizer -> the official names: Whisper encoder and decoder under the joint encoder-segmenter, the RVQ
    in vector-quantize-pytorch's per-layer layout, plus the unused implicit-codebook MLPs the official model saves."""
    out = {}
    for key, value in model.state_dict().items():
        part, rest = key.split(".", 1)
        if part == "encoder":
            out[f"{AUDIO}audio_encoder.encoder.{rest}"] = value
        elif part == "aggregator":
            out[f"{AUDIO}audio_segmenter.decoder.{rest}"] = value
        elif rest.startswith("project_"):
            out[f"audio_tower.vq.rvq.{rest}"] = value
    vq = model.quantizer
    for i in range(vq.num_quantizers):
        layer = f"audio_tower.vq.rvq.layers.{i}._codebook."
        out[layer + "embed"] = vq.embed[i][None].clone()
        out[layer + "embed_avg"] = vq.embed_avg[i][None].clone()
        out[layer + "cluster_size"] = vq.cluster_size[i][None].clone()
        out[layer + "initted"] = vq.initted[i].reshape(1).clone()
        out[f"audio_tower.vq.rvq.mlps.{i}.proj_in.weight"] = torch.randn(vq.codebook_dim, 2 * vq.codebook_dim)
    return out


def write_sharded(directory, state: dict, shards: int = 2) -> None:
    """``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, as transformers writes them."""
    from safetensors.torch import save_file

    keys = sorted(state)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].detach().clone().contiguous() for k in keys[s::shards]}  # clones: no shared storage
        save_file(part, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k].to(sb[k].dtype), sb[k]), k


def tiny_tokenizer():
    torch.manual_seed(0)
    tiny = taste.TasteConfig.tiny()
    config = dataclasses.replace(tiny, encoder=dataclasses.replace(tiny.encoder, num_layers=2, value_layer=1))
    model = taste.TasteTokenizer(config=config).eval()
    with torch.no_grad():
        model.quantizer.embed.normal_()
        model.quantizer.embed_avg.normal_()
        model.quantizer.cluster_size.uniform_(0, 5)
        model.quantizer.initted.fill_(1.0)
    return model


def test_tokenizer_and_unit_decoder_round_trip(tmp_path):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(1)
    decoder = taste.UnitDecoder(config=taste.UnitDecoderConfig.tiny()).eval()
    state = {**official_tokenizer_keys(tokenizer)}
    state.update({f"speech_decoder.{k}": v for k, v in decoder.state_dict().items()})
    write_sharded(tmp_path, state)

    loaded = official.load_tokenizer(str(tmp_path), config=tokenizer.config)
    assert_same_state(tokenizer, loaded)
    assert loaded.quantizer.embed.dtype == torch.float32
    mel = torch.randn(2, tokenizer.config.encoder.n_mels, 2 * tokenizer.config.encoder.frames)
    tokens, word_ids = torch.tensor([50, 51, 52, 60, 61]), torch.tensor([0, 0, 1, 0, 1])
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    with torch.no_grad():
        want, got = tokenizer(mel, tokens, cu, word_ids), loaded(mel, tokens, cu, word_ids)
    assert torch.equal(want.word_codes, got.word_codes) and torch.equal(want.word_embeddings, got.word_embeddings)

    loaded_decoder = official.load_unit_decoder(str(tmp_path), config=decoder.config)
    assert_same_state(decoder, loaded_decoder)


def test_spoken_lm_round_trip_with_a_separate_lm_head(tmp_path, monkeypatch):
    from conftest import require_taslm_dependencies

    require_taslm_dependencies()
    from taste.spoken_lm import SpokenLMConfig, TasteSpokenLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(2)
    lm = TasteSpokenLM.from_tokenizer(tokenizer, SpokenLMConfig.tiny())
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    state = official_tokenizer_keys(tokenizer)
    state.update({f"spoken_lm.{k}": v for k, v in lm.state_dict().items() if not k.startswith("vq.")})
    # The release probably stores the tied lm_head as a tensor of its own (spec: official_state_dict.json notes).
    head = [k for k in state if k.endswith("lm_head.weight")]
    assert head and lm.causal_lm.config.tie_word_embeddings
    write_sharded(tmp_path, state, shards=3)

    loaded = official.load_spoken_lm(str(tmp_path), config=lm.config)
    assert_same_state(lm, loaded)
    # Built on the meta device: the embedding and lm_head are one Parameter again, the rotary tables were rebuilt.
    causal = loaded.causal_lm
    assert causal.lm_head.weight is causal.model.embed_tokens.weight
    assert torch.equal(causal.model.rotary_emb.inv_freq, lm.causal_lm.model.rotary_emb.inv_freq)
    tokens, word_ids = torch.tensor([1000, 1001, 1002, 1003, 1004]), torch.tensor([0, 0, 1, 2, 2], dtype=torch.int32)
    cu, codes = torch.tensor([0, 5], dtype=torch.int32), torch.randint(0, 64, (3, 4))
    with torch.no_grad():
        want, got = (
            lm.eval().hidden_states(tokens, cu, word_ids, codes),
            loaded.hidden_states(tokens, cu, word_ids, codes),
        )
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    # What `taste import-official` writes for it loads back whole (`taste generate --model DIR`).
    loaded.save_pretrained(str(tmp_path / "spoken_lm"))
    again = TasteSpokenLM.from_pretrained(str(tmp_path / "spoken_lm"))
    assert_same_state(lm, again)
    assert again.causal_lm.lm_head.weight is again.causal_lm.model.embed_tokens.weight
    # A buffer the checkpoint does not hold and that is not rebuilt is named, not left on the meta device.
    monkeypatch.setattr(TasteSpokenLM, "_rebuild_rotary_tables", lambda self: None)
    with pytest.raises(ValueError, match=r"could not be built: \[.*rotary_emb.inv_freq"):
        official.load_spoken_lm(str(tmp_path), config=lm.config)


def test_import_official_command_writes_loadable_directories(tmp_path, monkeypatch):
    """``taste import-official`` at the released shapes would need the 5 GB checkpoint; here the loaders' presets
    are swapped for the tiny configs the checkpoint was written with."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(1)
    decoder = taste.UnitDecoder(config=taste.UnitDecoderConfig.tiny())
    state = official_tokenizer_keys(tokenizer)
    state.update({f"speech_decoder.{k}": v for k, v in decoder.state_dict().items()})
    src = tmp_path / "release"
    src.mkdir()
    write_sharded(src, state)
    monkeypatch.setattr(taste.TasteConfig, "official", classmethod(lambda cls: tokenizer.config))
    monkeypatch.setattr(taste.UnitDecoderConfig, "official", classmethod(lambda cls: decoder.config))
    voice = taste.VoiceGenerator(config=taste.VoiceGeneratorConfig.tiny())
    (src / "cosyvoice").mkdir()
    torch.save(voice.state_dict(), src / "cosyvoice" / "voice_generator.pth")
    monkeypatch.setattr(taste.VoiceGeneratorConfig, "cosyvoice_300m", classmethod(lambda cls: voice.config))
    from taste.cli import main

    out = tmp_path / "converted"
    assert main(["import-official", str(src), "-o", str(out), "--parts", "tokenizer", "unit_decoder", "voice"]) == 0
    assert_same_state(tokenizer, taste.TasteTokenizer.from_pretrained(str(out / "tokenizer")))
    assert_same_state(decoder, taste.UnitDecoder.from_pretrained(str(out / "unit_decoder")))
    assert_same_state(voice, taste.VoiceGenerator.from_pretrained(str(out / "voice")))
    assert official.load_official(str(src), ("voice",)).voice.config == voice.config


def test_pytorch_bin_checkpoints(tmp_path):
    """The ``pytorch_model.bin`` layouts (one file, or shards with their index) read the same."""
    torch.manual_seed(1)
    decoder = taste.UnitDecoder(config=taste.UnitDecoderConfig.tiny()).eval()
    state = {f"speech_decoder.{k}": v.clone() for k, v in decoder.state_dict().items()}
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    single.mkdir()
    sharded.mkdir()
    torch.save(state, single / "pytorch_model.bin")
    keys = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, sharded / name)
    index = {"weight_map": {k: name for name, part in halves.items() for k in part}}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    for directory in (single, sharded):
        assert_same_state(decoder, official.load_unit_decoder(str(directory), config=decoder.config))


def test_bad_checkpoint_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        official.read_official_tensors(str(tmp_path / "nowhere"), ("speech_decoder.",))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        official.read_official_tensors(str(tmp_path), ("speech_decoder.",))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "missing.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="names shards that are not in the directory"):
        official.read_official_tensors(str(tmp_path), ("a",))
    os.remove(tmp_path / "model.safetensors.index.json")
    from safetensors.torch import save_file

    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="not a TASTE / TASLM checkpoint"):
        official.read_official_tensors(str(tmp_path), ("speech_decoder.",))
    with pytest.raises(ValueError, match="parts must be among"):
        official.load_official(str(tmp_path), ("vocoder",))
    # files cut short (an interrupted download or copy) are named; before: safetensors' "header too small" alone
    whole = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: cannot read its tensors, is the file whole\?"):
        official.read_official_tensors(str(tmp_path), ("speech_decoder.",))
    os.remove(tmp_path / "model.safetensors")
    torch.save({"speech_decoder.w": torch.zeros(100)}, tmp_path / "pytorch_model.bin")
    whole = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"pytorch_model.bin: cannot read its tensors, is the file whole\?"):
        official.read_official_tensors(str(tmp_path), ("speech_decoder.",))


def test_released_key_list_loads_strictly_at_the_released_shapes():
    """Every tensor the released model saves (the spec's list, built from the official code) has a place in the
    three models at their official presets, with its shape, and every weight of theirs is supplied (strict loads
    on the meta device: no memory, no download)."""
    keys = official_keys()
    state = {k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta") for k, shape, dtype in keys}
    tokenizer = official.load_tokenizer(None, state={k: v for k, v in state.items() if k.startswith("audio_tower.")})
    assert tokenizer.encoder.conv1.weight.shape == (1280, 128, 3) and len(tokenizer.encoder.layers) == 32
    assert tokenizer.quantizer.embed.shape == (4, 512, 256)
    decoder = official.load_unit_decoder(None, state=state)
    assert decoder.config == taste.UnitDecoderConfig.official()
    from conftest import require_taslm_dependencies

    require_taslm_dependencies()
    with torch.device("meta"):
        lm = official.load_spoken_lm(None, state=state)
    assert sum(p.numel() for n, p in lm.named_parameters() if "lora_" in n) == 45_088_768


def test_the_key_list_is_the_specs():
    """tests/data/official_state_dict.json is a copy of the spec's; where the spec is beside this checkout (the
    project's own machines), the two must not have drifted apart."""
    spec = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "spec", "official_state_dict.json")
    if not os.path.isfile(spec):
        pytest.skip("no shared/spec beside this checkout")
    assert filecmp.cmp(spec, OFFICIAL_STATE_DICT, shallow=False), "copy the spec's file to tests/data again"
