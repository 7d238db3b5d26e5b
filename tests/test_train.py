import dataclasses
import json
import os
import warnings

import pytest
import torch
from conftest import torchrun_rank_digests

import taste
from taste import corpus
from taste.evaluate import evaluate, griffin_lim, resynthesize, units_to_wave
from taste.train import Stage1Model, TrainConfig, corpus_vocabulary, train
from taste.trainer import checkpoint_steps, latest_checkpoint, state_digest
from taste.unit_decoder import UnitDecoderConfig

NUM_UNITS = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A units manifest of 14 noise utterances (0.5-1.5 s) with random units, and a small seed model."""
    root = tmp_path_factory.mktemp("train")
    g = torch.Generator().manual_seed(0)
    rows = []
    os.makedirs(root / "wavs")
    for i in range(14):
        seconds = 0.5 + (i % 5) * 0.25
        audio = 0.1 * torch.randn(int(16000 * seconds), generator=g)
        corpus.write_wav(str(root / "wavs" / f"u{i}.wav"), audio)
        units = torch.randint(0, NUM_UNITS, (int(seconds * 50),), generator=g).tolist()
        rows.append({"id": f"u{i}", "path": f"wavs/u{i}.wav", "text": corpus.SENTENCES[i][:30].strip(), "units": units})
    with open(root / "units.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    tiny = taste.TasteConfig.tiny()
    tcfg = dataclasses.replace(
        tiny,
        encoder=dataclasses.replace(tiny.encoder, window_seconds=2.0, num_layers=1, value_layer=1),
        aggregator=dataclasses.replace(tiny.aggregator, num_layers=1),
        quantizer=dataclasses.replace(tiny.quantizer, codebook_size=8, kmeans_iters=3),
    )
    dcfg = UnitDecoderConfig.tiny(num_units=NUM_UNITS, spk_dim=80, text_layers=1, audio_layers=1, lm_layers=1)
    torch.manual_seed(0)
    Stage1Model(taste.TasteTokenizer(config=tcfg), taste.UnitDecoder(config=dcfg)).save_pretrained(root / "seed")
    return root


def config(data, out, **kw):
    base = dict(manifest=str(data / "units.jsonl"), out_dir=str(out), init_from=str(data / "seed"), steps=6,
                batch_size=4, save_every=2, log_every=1, eval_size=4, warmup=2, lr=3e-3)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_interrupted_run_resumes_to_the_same_weights(data, tmp_path):
    whole = train(config(data, tmp_path / "a"), progress=False)
    cfg = config(data, tmp_path / "b", keep_checkpoints=1)
    train(cfg, stop_after=3, progress=False)  # "killed" after step 3; its last checkpoint is step 2
    assert latest_checkpoint(cfg.out_dir).endswith("checkpoint-2")
    assert not os.path.isdir(tmp_path / "b" / "final")
    with pytest.raises(FileNotFoundError, match=r"'.*nothere' is not a directory \(expected a stage-1 run"):
        train(config(data, tmp_path / "x", init_from=str(tmp_path / "nothere")), progress=False)  # (before: named
        # 'nothere/tokenizer' as lacking a config.json)
    resumed = train(cfg, progress=False)
    assert state_digest(resumed) == state_digest(whole)
    assert checkpoint_steps(str(tmp_path / "a")) == [2, 4, 6] and checkpoint_steps(cfg.out_dir) == [6]
    assert bool(whole.tokenizer.quantizer.initted.all())  # stage vq: k-means ran on the first batch
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and all(r["loss"] > 0 for r in log)
    assert log[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_stages_train_their_own_parts(data, tmp_path):
    seed = Stage1Model.from_pretrained(str(data / "seed"))
    text = train(config(data, tmp_path / "text", stage="text", steps=2), progress=False)
    assert state_digest(text.tokenizer) == state_digest(seed.tokenizer)  # 1-1 leaves the tokenizer alone
    assert not torch.equal(text.decoder.llm_decoder.weight, seed.decoder.llm_decoder.weight)
    no_vq = train(config(data, tmp_path / "no_vq", stage="no_vq", steps=2, init_from=str(tmp_path / "text")),
                  progress=False)  # fmt: skip
    assert not torch.equal(
        no_vq.tokenizer.aggregator.layers[0].fc1.weight, seed.tokenizer.aggregator.layers[0].fc1.weight
    )
    assert not bool(no_vq.tokenizer.quantizer.initted.any())
    with open(tmp_path / "no_vq" / "final" / "train_config.json") as f:
        assert json.load(f)["stage"] == "no_vq"


def test_units_of_another_rate_are_named(data, tmp_path):
    """25 Hz tokens (CosyVoice 2's, say) train all the same, but the duration metrics and resynthesis read units as
    50 Hz: said before the first step."""
    from taste.train import UnitCorpus

    rows = [json.loads(line) for line in open(data / "units.jsonl")]
    for r in rows:
        r["units"], r["path"] = r["units"][::2], str(data / r["path"])
    (tmp_path / "half.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = Stage1Model.from_pretrained(str(data / "seed"))
    with pytest.warns(UserWarning, match=r"half.jsonl has 25.\d units per second of audio; this package's units"):
        UnitCorpus(str(tmp_path / "half.jsonl")).check(model, str(tmp_path / "half.jsonl"), need_audio=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UnitCorpus(str(data / "units.jsonl")).check(model, str(data / "units.jsonl"), need_audio=True)


def test_a_seed_tokenizer_trains_with_a_fresh_decoder(data, tmp_path):
    """The official recipe starts stage 1 from a tokenizer seeded from Whisper (`taste init-tokenizer --whisper`),
    a directory holding the tokenizer alone: before, init_from refused it ("has no config.json" in tokenizer/)."""
    seed = Stage1Model.from_pretrained(str(data / "seed")).tokenizer
    seed.save_pretrained(str(tmp_path / "seed_tokenizer"))
    text = train(config(data, tmp_path / "text", stage="text", steps=2, init_from=str(tmp_path / "seed_tokenizer")),
                 progress=False)  # fmt: skip
    assert state_digest(text.tokenizer) == state_digest(seed)  # 1-1 leaves the tokenizer alone
    decoder = text.decoder.config
    want = UnitDecoderConfig.tiny(num_units=NUM_UNITS, taste_dim=seed.config.aggregator.d_model, spk_dim=80,
                                  text_vocab=seed.config.aggregator.vocab_size)  # fmt: skip
    assert decoder == want
    no_vq = train(config(data, tmp_path / "no_vq", stage="no_vq", steps=2, init_from=str(tmp_path / "seed_tokenizer"),
                         freeze_encoder=True), progress=False)  # fmt: skip
    assert no_vq.tokenizer.config.freeze_encoder and not any(
        p.requires_grad for p in no_vq.tokenizer.encoder.parameters()
    )
    assert torch.equal(no_vq.tokenizer.encoder.conv1.weight, seed.encoder.conv1.weight)
    assert not torch.equal(no_vq.tokenizer.aggregator.layers[0].fc1.weight, seed.aggregator.layers[0].fc1.weight)
    resumed = train(config(data, tmp_path / "no_vq", stage="no_vq", steps=3, init_from=str(tmp_path / "seed_tokenizer"),
                           freeze_encoder=True), progress=False)  # fmt: skip
    assert resumed.tokenizer.config.freeze_encoder


@pytest.mark.filterwarnings("ignore:taste. ResidualVQ stages")  # (2 steps: dropout left stages unrun)
def test_evaluation_and_resynthesis(data, tmp_path):
    out = tmp_path / "run"
    train(config(data, out, steps=2), progress=False)
    m = evaluate(str(out), str(data / "units.jsonl"), eval_size=4, batch_size=3)
    with pytest.raises(ValueError, match=r"eval_size must be a positive int \(the manifest's last rows\), got 0"):
        evaluate(str(out), str(data / "units.jsonl"), eval_size=0)  # (before: ZeroDivisionError)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        evaluate(str(out), str(data / "units.jsonl"), batch_size=0)
    assert m["stage"] == "vq" and m["utterances"] == 4
    assert 0 <= m["unit_top1"] <= m["unit_top5"] <= 1 and m["unit_ce"] > 0 and m["unit_ce_taste_shuffled"] > 0
    assert m["duration_abs_rel_error"] >= 0 and m["code_bitrate_bps"] > 0
    # Ablation hook: the decoder given other word rows than the tokenizer's (here the same zero row for every word,
    # so shuffling them cannot change anything).
    rows = corpus.read_manifest(str(data / "units.jsonl"))
    calls = []

    def zeros(idx):
        calls.append(list(idx))
        return torch.zeros(sum(len(rows[i]["text"].split()) for i in idx), 128)

    z = evaluate(str(out), str(data / "units.jsonl"), eval_size=4, batch_size=3, word_rows=zeros)
    assert calls == [[10, 11, 12], [13]] and z["stage"] == "no_vq"
    assert z["unit_ce_taste_shuffled"] == z["unit_ce"] and z["unit_ce"] != m["unit_ce"]
    audio, _ = corpus.read_wav(rows[0]["audio_path"])
    centroids = torch.randn(NUM_UNITS, 80) * 0.3
    codes, wave = resynthesize(str(out), audio, rows[0]["text"], centroids)
    assert codes.shape == (len(rows[0]["text"].split()), 4)
    assert wave.dim() == 1 and wave.numel() % 320 == 0 and wave.numel() > 0 and wave.abs().max() <= 0.9 + 1e-6
    # centroids of another `taste units` run (before: an IndexError in Griffin-Lim's frames, after the generation)
    with pytest.raises(ValueError, match=f"centroids has 8 rows but the unit decoder has {NUM_UNITS} units"):
        resynthesize(str(out), audio, rows[0]["text"], centroids[:8])
    with pytest.raises(ValueError, match="centroids must have 80 or 128 mel bins per row, got 40"):
        resynthesize(str(out), audio, rows[0]["text"], centroids[:, :40])
    with pytest.raises(ValueError, match=r"units must lie in \[0, 8\) \(the centroids' rows\), got \[0, 9\]"):
        units_to_wave(torch.tensor([0, 9]), centroids[:8])
    with pytest.raises(ValueError, match=r"centroids must be a \(num_units, n_mels\) float tensor, got \(16,\)"):
        units_to_wave(torch.tensor([0]), centroids[:, 0])


def test_ctc_loss_reads_the_tied_embedding_with_the_start_token_as_blank(data):
    model = Stage1Model.from_pretrained(str(data / "seed"))
    agg = model.tokenizer.aggregator
    table = agg.embed_tokens.weight.detach()
    text = model.tokenizer.text_tokenizer(["hello there", "fox"]).asr
    vocab = corpus_vocabulary(model.tokenizer, ["hello there", "fox", "a dog"])
    assert torch.equal(vocab, vocab.unique()) and bool(torch.isin(text.tokens, vocab).all())
    classes = torch.cat([agg.prefix_ids[:1], vocab])
    # Frames that spell each transcript (blank, token, blank, ...): states along the least-squares direction that
    # scores the wanted class far above the others, so the path's probability is ~1 and the loss ~0.
    frames = 12
    spelled = torch.zeros(2, frames, dtype=torch.long)  # class indices, 0 = blank
    for b, toks in enumerate(text.tokens.split(text.cu_seqlens.diff().tolist())):
        for j, t in enumerate(toks):
            spelled[b, 2 * j + 1] = int((vocab == t).nonzero()) + 1
    rows = table[classes]  # (C, d)
    directions = torch.linalg.pinv(rows) @ torch.eye(len(classes))  # (d, C): rows @ directions = I
    h_good = 200 * directions.T[spelled]  # (2, frames, d)
    with torch.no_grad():
        good = float(model.ctc_loss(h_good, text.tokens, text.cu_seqlens, vocab))
        swapped = float(model.ctc_loss(h_good.flip(0), text.tokens, text.cu_seqlens, vocab))
        uniform = float(model.ctc_loss(torch.zeros(2, frames, table.shape[1]), text.tokens, text.cu_seqlens, vocab))
    assert good < 1e-3
    assert swapped > 10  # the frames spell the other utterance's transcript
    assert 0.5 < uniform < float(torch.tensor(float(len(classes))).log())  # log C per frame less the paths' count
    with pytest.raises(ValueError, match="not in ctc_vocab"):
        model.ctc_loss(h_good, text.tokens, text.cu_seqlens, vocab[vocab != text.tokens[0]])


def test_asr_stage_with_ctc_trains_the_encoder_and_evaluates(data, tmp_path):
    seed = Stage1Model.from_pretrained(str(data / "seed"))
    out = tmp_path / "asr"
    asr = train(config(data, out, stage="asr", steps=2, asr_ctc_weight=1.0), progress=False)
    assert not torch.equal(asr.tokenizer.encoder.conv1.weight, seed.tokenizer.encoder.conv1.weight)
    m = evaluate(str(out), str(data / "units.jsonl"), eval_size=4, batch_size=3)
    assert m["stage"] == "asr" and m["utterances"] == 4
    assert m["asr_ce"] > 0 and m["asr_ce_other_audio"] > 0 and 0 <= m["asr_top1"] <= 1
    with pytest.raises(ValueError, match="asr_ctc_weight must be >= 0"):
        config(data, tmp_path, stage="asr", asr_ctc_weight=-1.0)
    with pytest.raises(ValueError, match=r"asr_token_dropout must be in \[0, 1\)"):
        config(data, tmp_path, stage="asr", asr_token_dropout=1.0)


def test_griffin_lim_recovers_a_signal():
    t = torch.arange(16000) / 16000
    x = torch.sin(2 * torch.pi * 440 * t) + 0.5 * torch.sin(2 * torch.pi * 1250 * t)
    window = torch.hann_window(400)
    target = torch.stft(x, 400, 160, window=window, return_complex=True).abs()
    y = griffin_lim(target, iters=64)
    got = torch.stft(y, 400, 160, window=window, return_complex=True).abs()
    n = min(got.shape[1], target.shape[1])
    error = (got[:, 2 : n - 2] - target[:, 2 : n - 2]).norm() / target[:, 2 : n - 2].norm()
    assert error < 0.1


def test_ddp_on_two_cpu_ranks_keeps_identical_weights(data, tmp_path):
    cfg = config(data, tmp_path / "ddp", steps=3, batch_size=2, write_rank_digests=True)
    digests = torchrun_rank_digests("train-tokenizer", dataclasses.asdict(cfg), tmp_path / "ddp")
    assert digests[0] == digests[1]
    assert digests[0] != state_digest(Stage1Model.from_pretrained(str(data / "seed")))


def test_bad_config(data, tmp_path):
    with pytest.raises(ValueError, match="stage must be one of"):
        config(data, tmp_path, stage="stage2")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        config(data, tmp_path, batch_size=0)
    (tmp_path / "c.json").write_text(json.dumps({"manifest": "m", "out_dir": "o", "learning_rate": 1}))
    with pytest.raises(ValueError, match=r"unknown training options \['learning_rate'\]"):
        TrainConfig.from_json(str(tmp_path / "c.json"))
    with pytest.raises(ValueError, match="not more than eval_size=20"):
        train(config(data, tmp_path / "x", eval_size=20), progress=False)
    (tmp_path / "plain.jsonl").write_text('{"id": "a", "path": "a.wav", "text": "hi"}\n')
    corpus.write_wav(str(tmp_path / "a.wav"), torch.zeros(1600))
    with pytest.raises(ValueError, match="has no 'units' field"):
        train(config(data, tmp_path / "y", manifest=str(tmp_path / "plain.jsonl")), progress=False)


@pytest.mark.parametrize(
    "change, stage, message",
    [({"text": " "}, "vq", "row 'u9' of {m} \\(texts\\) has no words"),
     ({"units": []}, "vq", "row 'u9' of {m} has no units"),
     ({"path": "long.wav"}, "vq", "row 'u9' of {m} lasts 2.50 s, longer than the model's 2 s window"),
     ({"text": " ".join(["word"] * 450)}, "text", "row 'u9' of {m} \\(texts\\) has 450 ASR tokens, more than")],
)  # fmt: skip
def test_bad_manifest_rows_are_named_before_the_first_step(data, tmp_path, change, stage, message):
    """Before: the run failed when the row's batch came up ("texts[2] has no words", the 2 counting within that
    batch), after however many steps, or a row without units made an empty target."""
    rows = [json.loads(line) for line in open(data / "units.jsonl")]
    rows[9].update(change)
    corpus.write_wav(str(data / "long.wav"), torch.zeros(40000))
    manifest = data / f"bad_{tmp_path.name}.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(data, tmp_path / "run", manifest=str(manifest), stage=stage)
    with pytest.raises(ValueError, match=message.format(m=manifest)):
        train(cfg, progress=False)
    assert not os.path.exists(tmp_path / "run") or not checkpoint_steps(str(tmp_path / "run"))


def test_rows_speaker_vectors_feed_the_unit_decoder(data, tmp_path):
    """Rows with 'speaker' vectors (`taste s3-units --speaker-model`: CAM++, as the official recipe) are the unit
    decoder's speaker input, and a fresh decoder takes their width; before, every run took the 80 mean log-mel
    values."""
    from taste.train import UnitCorpus

    rows = [json.loads(line) for line in open(data / "units.jsonl")]
    g = torch.Generator().manual_seed(7)
    for r in rows:
        r["path"] = str(data / r["path"])
        r["speaker"] = torch.randn(6, generator=g).tolist()
    manifest = tmp_path / "spk.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus_ = UnitCorpus(str(manifest))
    assert corpus_.spk_dim == 6
    seed = Stage1Model.from_pretrained(str(data / "seed"))
    batch = corpus_.batch([2, 5], seed, "cpu", need_audio=False)
    torch.testing.assert_close(batch["speaker"], torch.tensor([rows[2]["speaker"], rows[5]["speaker"]]))
    with pytest.raises(ValueError, match=r"the unit decoder takes \(80,\) speaker vectors, .*spk.jsonl gives \(6,\)"):
        train(config(data, tmp_path / "a", manifest=str(manifest)), progress=False)
    seed.tokenizer.save_pretrained(str(tmp_path / "seed_tokenizer"))
    model = train(config(data, tmp_path / "b", manifest=str(manifest), stage="text", steps=1,
                         init_from=str(tmp_path / "seed_tokenizer")), progress=False)  # fmt: skip
    assert model.decoder.config.spk_dim == 6
    rows[3]["speaker"] = rows[3]["speaker"][:5]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"row 'u3' of .*: 'speaker' must be a list of 6 numbers"):
        UnitCorpus(str(manifest))
    del rows[0]["speaker"]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="row 'u1' of .* has a 'speaker' vector and the first row has none"):
        UnitCorpus(str(manifest))
