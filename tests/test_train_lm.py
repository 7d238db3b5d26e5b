"""`taste train-lm` (exact resume, held-out metrics), `taste generate` and `taste continue` on tiny models."""

import dataclasses
import json
import os

import pytest
import torch
from conftest import require_taslm_dependencies, tiny_stage1

require_taslm_dependencies()

from conftest import torchrun_rank_digests  # noqa: E402

from taste.cli import main  # noqa: E402
from taste.corpus import SENTENCES, write_wav  # noqa: E402
from taste.spoken_lm import SpokenLMConfig, TasteSpokenLM  # noqa: E402
from taste.tokenizer import TasteConfig, TasteTokenizer  # noqa: E402
from taste.train_lm import CodeCorpus, LMTrainConfig, train_lm  # noqa: E402
from taste.trainer import state_digest  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    tok = TasteTokenizer(config=TasteConfig.tiny())
    with torch.no_grad():
        tok.quantizer.embed.normal_()
        tok.quantizer.initted.fill_(1)
    tok.save_pretrained(str(root / "tokenizer"))
    g = torch.Generator().manual_seed(0)
    q, k = tok.quantizer.num_quantizers, tok.quantizer.codebook_size
    with open(root / "codes.jsonl", "w") as f:
        for i in range(20):
            words = SENTENCES[i % len(SENTENCES)].split()[:6]
            codes = torch.randint(0, k, (len(words), q), generator=g).tolist()
            f.write(json.dumps({"id": f"u{i}", "words": words, "codes": codes}) + "\n")
    return root


def config(data, out, **kw):
    base = dict(codes=str(data / "codes.jsonl"), tokenizer=str(data / "tokenizer"), out_dir=str(out), steps=4,
                batch_size=4, save_every=2, log_every=1, eval_size=4, warmup=1, lr=1e-2)  # fmt: skip
    return LMTrainConfig(**{**base, **kw})


def test_corpus_tokenises_words_like_training(data):
    corpus = CodeCorpus(str(data / "codes.jsonl"))
    b = corpus.batch([0, 1], "cpu")
    assert b["cu_seqlens"].dtype == torch.int32 and b["cu_seqlens"][-1] == b["tokens"].numel()
    words = int(b["word_ids"][b["cu_seqlens"][1] - 1]) + 1 + int(b["word_ids"][-1]) + 1
    assert b["codes"].shape[0] == words


def test_codes_file_errors_name_the_line(tmp_path):
    path = tmp_path / "codes.jsonl"
    path.write_text('{"words": ["hi"], "codes": [[1, 2, 3, 4]]}\n{"words": ["hi"], "codes": [[1, 2, 3, 4]\n')
    with pytest.raises(ValueError, match=r"codes.jsonl:2: not valid JSON: Expecting ',' delimiter"):
        CodeCorpus(str(path))
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"codes.jsonl:1: a codes row must be a JSON object, got list"):
        CodeCorpus(str(path))


def test_resume_reaches_the_same_weights(data, tmp_path):
    straight = train_lm(config(data, tmp_path / "a"), progress=False)
    train_lm(config(data, tmp_path / "b"), stop_after=3, progress=False)  # interrupted after step 3
    assert os.path.isdir(tmp_path / "b" / "checkpoint-2") and not os.path.isdir(tmp_path / "b" / "final")
    resumed = train_lm(config(data, tmp_path / "b"), progress=False)  # resumes at 2, step 3 is redone
    assert state_digest(resumed) == state_digest(straight)
    metrics = json.load(open(tmp_path / "a" / "final" / "eval.json"))
    assert 0 <= metrics["text_accuracy"] <= 1 and "code_accuracy_3" in metrics and "code_accuracy_majority_3" in metrics
    log = [json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all("tokens_per_s" in r for r in log)
    again = TasteSpokenLM.from_pretrained(str(tmp_path / "a" / "final"))
    assert state_digest(again) == state_digest(straight)


def test_cli_train_generate_and_bad_config(data, tmp_path, capsys):
    cfg = tmp_path / "lm.json"
    cfg.write_text(json.dumps({**json.loads(json.dumps(config(data, tmp_path / "run").__dict__)), "steps": 2}))
    assert main(["train-lm", str(cfg), "--quiet"]) == 0
    out = tmp_path / "gen.jsonl"
    args = ["generate", str(tmp_path / "run"), "--greedy", "--extra-words", "2", "--max-new-tokens", "12", "-o"]
    assert main([*args, str(out), "--prompt", "the cat sat", "--prompt", "a dog"]) == 0
    rows = [json.loads(line) for line in open(out)]
    assert [r["prompt"] for r in rows] == ["the cat sat", "a dog"]
    assert all(len(r["codes"]) == len(r["words"]) >= 1 for r in rows)
    assert main([*args, str(out), "--num", "3"]) == 0
    assert len(open(out).readlines()) == 3
    assert main([*args, str(out), "--num", "2", "--codes", str(data / "codes.jsonl")]) == 0  # speech prompts
    rows = [json.loads(line) for line in open(out)]
    assert [r["prompt"] for r in rows] == [" ".join(w) for w in CodeCorpus(str(data / "codes.jsonl")).words[:2]]
    instruct = [*args, str(tmp_path / "qa.jsonl"), "--num", "2", "--codes", str(data / "codes.jsonl"),
                "--instruct-prefix", "128000,128006,882,128007,271", "--instruct-suffix", "128009, 128006 78191",
                "--stop-id", "128009"]  # fmt: skip
    assert main(instruct) == 0  # (the official instruct mode: tests/test_generate.py checks its tokens)
    assert main([*args, str(tmp_path / "o.jsonl"), "--prompt", "the cat", "--official-sampling"]) == 0
    qa = [json.loads(line) for line in open(tmp_path / "qa.jsonl")]
    assert [r["prompt"] for r in qa] == [r["prompt"] for r in rows]
    assert all(len(r["codes"]) == len(r["words"]) for r in qa)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # (argparse's usage error)
        main([*instruct[:-4], "--instruct-suffix", "1,x"])
    assert "expected token ids separated by commas, got '1,x'" in capsys.readouterr().err
    assert main(["eval-lm", str(tmp_path / "run"), str(data / "codes.jsonl"), "--eval-size", "4", "--json",
                 str(tmp_path / "m.json")]) == 0  # fmt: skip
    assert "code_accuracy_majority_0" in json.load(open(tmp_path / "m.json"))
    assert main(["eval-lm", str(tmp_path / "run"), str(data / "codes.jsonl"), "--eval-size", "20"]) == 1
    capsys.readouterr()
    evaluation = ["eval-lm", str(tmp_path / "run"), str(data / "codes.jsonl"), "--eval-size", "4"]
    assert main([*evaluation, "--batch-size", "0"]) == 1
    assert "batch_size must be a positive int, got 0" in capsys.readouterr().err  # (before: "range() arg 3 ...")
    assert main(["merge-lora", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    merged = TasteSpokenLM.from_pretrained(str(tmp_path / "merged"))
    assert merged.config.lora_r == 0 and not any("lora_" in n for n, _ in merged.named_parameters())
    cfg.write_text(json.dumps({"codes": "x", "tokenizer": "y", "out_dir": "z", "learning_rate": 1}))
    assert main(["train-lm", str(cfg)]) == 1
    with pytest.raises(ValueError, match="preset must be one of"):
        config(data, tmp_path / "c", preset="huge")


def test_cli_score_lm_scores_rows_and_pairs(data, tmp_path, capsys):
    """`taste score-lm`: every row's sums equal TasteSpokenLM.score's on that row alone; with --against, the
    accuracies count the pairs the rows' scores prefer (a file against itself ties everywhere: one half)."""
    torch.manual_seed(3)
    lm = TasteSpokenLM.from_tokenizer(TasteTokenizer.from_pretrained(str(data / "tokenizer")), SpokenLMConfig.tiny())
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name or "pad_" in name or "fc_mu" in name:
                p.normal_(0, 0.2)
    lm.save_pretrained(str(tmp_path / "lm"))
    rows = [json.loads(line) for line in open(data / "codes.jsonl")][:6]
    wrong = [{**r, "words": r["words"][::-1], "codes": r["codes"][::-1]} for r in rows]  # the words reversed
    (tmp_path / "right.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "wrong.jsonl").write_text("".join(json.dumps(r) + "\n" for r in wrong))
    lm = TasteSpokenLM.from_pretrained(str(tmp_path / "lm")).eval()
    args = ["score-lm", str(tmp_path / "lm"), str(tmp_path / "right.jsonl"), "--batch-size", "4"]
    assert main([*args, "--against", str(tmp_path / "wrong.jsonl"), "-o", str(tmp_path / "s.jsonl"), "--json",
                 str(tmp_path / "summary.json")]) == 0  # fmt: skip
    scored = [json.loads(line) for line in open(tmp_path / "s.jsonl")]
    corpus = CodeCorpus(str(tmp_path / "right.jsonl"))
    for i, r in enumerate(scored):
        b = corpus.batch([i], "cpu")
        alone = lm.score(**b)
        assert r["id"] == rows[i]["id"] and r["tokens"] == b["tokens"].numel() and r["words"] == len(rows[i]["words"])
        assert r["text_logprob"] == pytest.approx(float(alone.text[0]), abs=1e-4)
        assert r["taste_logprob"] == pytest.approx(float(alone.taste[0]), abs=1e-3)
        assert r["against"]["id"] == rows[i]["id"] and r["against"]["words"] == r["words"]
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["rows"] == summary["pairs"] == 6
    for key in ("text", "taste"):
        wins = sum(r[f"{key}_logprob"] > r["against"][f"{key}_logprob"] for r in scored)
        assert summary[f"accuracy_{key}"] == pytest.approx(wins / 6)
    total = sum(r["text_logprob"] + r["taste_logprob"] > r["against"]["text_logprob"] + r["against"]["taste_logprob"]
                for r in scored)  # fmt: skip
    assert summary["accuracy_total"] == pytest.approx(total / 6)
    assert summary["mean_text_logprob"] == pytest.approx(sum(r["text_logprob"] for r in scored) / 6)
    capsys.readouterr()
    assert main([*args, "--against", str(tmp_path / "right.jsonl"), "--per-token", "--text-only"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["accuracy_text"] == summary["accuracy_taste"] == summary["accuracy_total"] == 0.5
    assert summary["mean_taste_logprob"] == 0 and summary["mean_words"] == 0
    assert main([*args, "--against", str(data / "codes.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "codes.jsonl has 20 rows" in err and "right.jsonl 6: the rows must pair up" in err


def test_preference_accuracy_per_token_and_ties():
    from taste.train_lm import preference_accuracy

    def row(text, taste, tokens, words):
        return {"text_logprob": text, "taste_logprob": taste, "tokens": tokens, "words": words}

    right = [row(-10.0, -8.0, 5, 2), row(-6.0, -3.0, 2, 1), row(-4.0, -2.0, 2, 1)]
    wrong = [row(-12.0, -6.0, 6, 3), row(-4.0, -3.0, 1, 1), row(-4.0, -2.0, 2, 1)]
    # sums: text win, loss, tie; taste loss, tie, tie; total -18 = -18 tie, -9 < -7 loss, tie
    assert preference_accuracy(right, wrong) == {"pairs": 3, "accuracy_text": 1.5 / 3, "accuracy_taste": 1 / 3,
                                                 "accuracy_total": 1 / 3}  # fmt: skip
    # per token / word: text -2 = -2 tie, -3 > -4 win, tie; taste -4 < -2 loss, tie, tie; total -6 < -4, -6 > -7, tie
    assert preference_accuracy(right, wrong, per_token=True) == {
        "pairs": 3, "accuracy_text": 2 / 3, "accuracy_taste": 1 / 3, "accuracy_total": 1.5 / 3}  # fmt: skip
    with pytest.raises(ValueError, match="must pair up row by row, got 3 and 2 rows"):
        preference_accuracy(right, wrong[:2])


def test_codes_outside_the_codebook_name_their_row(data, tmp_path):
    """Before: rvq_decode's "indices must lie in [-1, K=64)" when the row's batch came up, with no row named."""
    rows = [json.loads(line) for line in open(data / "codes.jsonl")]
    rows[7]["codes"][1][2] = 64
    bad = tmp_path / "codes.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"codes.jsonl:8: codes must lie in \[-1, 64\) \(the model's codebook size"):
        CodeCorpus(str(bad), num_quantizers=4, codebook_size=64)
    assert len(CodeCorpus(str(data / "codes.jsonl"), num_quantizers=4, codebook_size=64)) == 20


def test_codes_of_other_codebooks_are_refused(data, tmp_path):
    """`taste encode` writes its codebooks' digest beside each row's codes; train-lm, generate --codes and eval-lm
    refuse rows of other codebooks. Before, codes of another tokenizer (or of another training of it, or a
    no_vq tokenizer whose codebooks were never initialised) decoded into wrong TASTE rows without a word."""
    lm = TasteSpokenLM.from_tokenizer(TasteTokenizer.from_pretrained(str(data / "tokenizer")), SpokenLMConfig.tiny())
    digest = lm.vq.codebook_digest()
    assert digest == TasteTokenizer.from_pretrained(str(data / "tokenizer")).quantizer.codebook_digest()
    assert len(digest) == 16 and lm.vq.to(torch.bfloat16).codebook_digest() == digest  # (a cast keeps it)
    lm.vq.float()
    rows = [json.loads(line) for line in open(data / "codes.jsonl")]
    for r in rows:
        r["codebooks"] = digest
    rows[5]["codebooks"] = "0123456789abcdef"
    path = tmp_path / "codes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=rf"codes.jsonl:6: codes of codebooks 0123456789abcdef, but the model's are "
                                         rf"{digest} \(another tokenizer's codes"):  # fmt: skip
        CodeCorpus.for_model(str(path), lm)
    del rows[5]["codebooks"]  # (rows without a digest, e.g. written by hand: not checked)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(CodeCorpus.for_model(str(path), lm)) == 20
    with torch.no_grad():
        lm.vq.embed[0, 0, 0] += 1e-2
    assert lm.vq.codebook_digest() != digest


def test_continue_end_to_end(data, tmp_path, capsys):
    from conftest import whisper_around
    from safetensors.torch import save_file

    from taste.asr import WhisperTranscriber
    from taste.corpus import read_wav
    from taste.train import Stage1Model

    stage1 = tiny_stage1()
    stage1.save_pretrained(str(tmp_path / "stage1"))
    lm = TasteSpokenLM.from_tokenizer(stage1.tokenizer, SpokenLMConfig.tiny())
    lm.save_pretrained(str(tmp_path / "lm"))
    save_file({"centroids": torch.randn(16, 80)}, str(tmp_path / "centroids.safetensors"))
    t = torch.arange(16000) / 16000
    write_wav(str(tmp_path / "prompt.wav"), 0.3 * torch.sin(2 * torch.pi * 220 * t))
    out = tmp_path / "cont.wav"
    argv = ["continue", str(tmp_path / "prompt.wav"), "--text", "hello there", "--lm", str(tmp_path / "lm"),
            "--tokenizer-model", str(tmp_path / "stage1"), "--centroids", str(tmp_path / "centroids.safetensors"),
            "--greedy", "--extra-words", "1", "--max-new-tokens", "6", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert out.stat().st_size > 1000
    capsys.readouterr()
    qa = [*argv[:-1], str(tmp_path / "answer.wav"), "--only-new", "--instruct-prefix", "128000,128006,882,128007,271",
          "--instruct-suffix", "128009,128006,78191,128007,271", "--stop-id", "128009"]  # fmt: skip
    assert main(qa) == 0  # a spoken question answered (the official instruct mode), the answer alone synthesised
    answer = capsys.readouterr().out.split("continuation: ")[1].split("\n")[0].split()
    assert answer and (tmp_path / "answer.wav").stat().st_size > 1000
    # the prompt transcribed by a Whisper that shares the tokenizer's encoder (the official demo's ASR)
    whisper_around(stage1.tokenizer.encoder, tmp_path / "whisper", max_new_tokens=4)
    heard = WhisperTranscriber.from_whisper(str(tmp_path / "whisper"), encoder=True).transcribe(
        [read_wav(str(tmp_path / "prompt.wav"))[0]])[0].split()  # fmt: skip
    asr = [*argv[:2], "--asr", str(tmp_path / "whisper"), *argv[4:]]
    capsys.readouterr()
    assert main(asr) == 0
    printed = capsys.readouterr().out
    assert heard and printed.startswith(f"prompt: {' '.join(heard)}\ncontinuation: ")
    assert main([*asr, "--text", "hello there"]) == 1
    assert "give --text (the prompt's transcript) or --asr" in capsys.readouterr().err
    other = Stage1Model.from_preset("tiny", num_units=16, freeze_encoder=None)  # (another tokenizer's codebooks)
    other.save_pretrained(str(tmp_path / "other"))
    argv[argv.index("--tokenizer-model") + 1] = str(tmp_path / "other")
    assert main(argv) == 1
    assert "the tokenizer's codebooks (" in capsys.readouterr().err


def test_continue_with_the_voice_generator(tmp_path, capsys):
    """S3 units (the release's unit decoder) go through the voice generator: a stage-1 model in `taste
    import-official`'s layout (tokenizer/ + unit_decoder/), a speaker vector for both, 22.05 kHz out."""
    from taste.corpus import read_wav
    from taste.voice import VoiceGenerator, VoiceGeneratorConfig

    stage1 = tiny_stage1()
    stage1.tokenizer.save_pretrained(str(tmp_path / "official" / "tokenizer"))
    stage1.decoder.save_pretrained(str(tmp_path / "official" / "unit_decoder"))
    TasteSpokenLM.from_tokenizer(stage1.tokenizer, SpokenLMConfig.tiny()).save_pretrained(str(tmp_path / "lm"))
    spk_dim = stage1.decoder.config.spk_dim
    VoiceGenerator(config=VoiceGeneratorConfig.tiny(num_units=16, spk_dim=spk_dim)).save_pretrained(str(tmp_path / "v"))
    (tmp_path / "spk.json").write_text(json.dumps([0.1] * spk_dim))
    t = torch.arange(16000) / 16000
    write_wav(str(tmp_path / "prompt.wav"), 0.3 * torch.sin(2 * torch.pi * 220 * t))
    out = tmp_path / "cont.wav"
    argv = ["continue", str(tmp_path / "prompt.wav"), "--text", "hello there", "--lm", str(tmp_path / "lm"),
            "--tokenizer-model", str(tmp_path / "official"), "--voice", str(tmp_path / "v"), "--speaker",
            str(tmp_path / "spk.json"), "--greedy", "--extra-words", "1", "--max-new-tokens", "6",
            "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    wave, rate = read_wav(str(out))
    assert rate == 22050 and wave.numel() > 0 and wave.numel() % 256 == 0
    assert main(argv + ["--centroids", str(out)]) == 1  # (both)
    assert "give --centroids" in capsys.readouterr().err
    other = VoiceGeneratorConfig.tiny(num_units=16, spk_dim=spk_dim + 2)
    VoiceGenerator(config=other).save_pretrained(str(tmp_path / "v2"))
    argv2 = list(argv)
    argv2[argv2.index("--voice") + 1] = str(tmp_path / "v2")
    with pytest.warns(UserWarning, match="the voice generator gets zeros"):
        assert main(argv2) == 0
    (tmp_path / "spk.json").write_text(json.dumps([0.1] * (spk_dim + 1)))
    assert main(argv) == 1
    assert f"speaker must be a ({spk_dim},) vector" in capsys.readouterr().err


def test_continue_takes_the_prompts_cam_vector(tmp_path, capsys):
    """As the official demo: with the release's speaker encoder in the import-official directory and no --speaker,
    the unit decoder and the voice generator get the prompt's own CAM++ vector; a .wav --speaker is another
    reference's."""
    import shutil

    from taste.corpus import read_wav
    from taste.speaker import SpeakerEncoder
    from taste.voice import VoiceGenerator, VoiceGeneratorConfig

    campplus = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "campplus_tiny.onnx")
    stage1 = tiny_stage1(spk_dim=192)
    stage1.tokenizer.save_pretrained(str(tmp_path / "official" / "tokenizer"))
    stage1.decoder.save_pretrained(str(tmp_path / "official" / "unit_decoder"))
    os.makedirs(tmp_path / "official" / "speaker")
    shutil.copy(campplus, tmp_path / "official" / "speaker" / "speaker_embed.onnx")
    TasteSpokenLM.from_tokenizer(stage1.tokenizer, SpokenLMConfig.tiny()).save_pretrained(str(tmp_path / "lm"))
    VoiceGenerator(config=VoiceGeneratorConfig.tiny(num_units=16, spk_dim=192)).save_pretrained(str(tmp_path / "v"))
    t = torch.arange(16000) / 16000
    write_wav(str(tmp_path / "prompt.wav"), 0.3 * torch.sin(2 * torch.pi * 220 * t) + 0.05 * torch.sin(900 * t))
    write_wav(str(tmp_path / "other.wav"), 0.2 * torch.randn(12000, generator=torch.Generator().manual_seed(1)))
    encoder = SpeakerEncoder.from_official(campplus)
    for name in ("prompt", "other"):
        vector = encoder.speaker([read_wav(str(tmp_path / f"{name}.wav"))[0]])
        (tmp_path / f"{name}.json").write_text(json.dumps(vector.tolist()))
    base = ["continue", str(tmp_path / "prompt.wav"), "--text", "hello there", "--lm", str(tmp_path / "lm"),
            "--tokenizer-model", str(tmp_path / "official"), "--voice", str(tmp_path / "v"), "--greedy",
            "--extra-words", "1", "--max-new-tokens", "6"]  # fmt: skip
    runs = {"default": [], "prompt": ["--speaker", str(tmp_path / "prompt.json")],
            "other_wav": ["--speaker", str(tmp_path / "other.wav")],
            "other": ["--speaker", str(tmp_path / "other.json")]}  # fmt: skip
    waves = {}
    for name, extra in runs.items():
        assert main(base + extra + ["-o", str(tmp_path / f"{name}.wav")]) == 0, name
        waves[name] = read_wav(str(tmp_path / f"{name}.wav"))[0]
    assert "speaker: the prompt's CAM++ vector" in capsys.readouterr().out
    assert torch.equal(waves["default"], waves["prompt"])
    assert torch.equal(waves["other_wav"], waves["other"])
    assert not torch.equal(waves["default"], waves["other"])


def test_ddp_on_two_cpu_ranks_keeps_identical_weights(data, tmp_path):
    cfg = config(data, tmp_path / "ddp", steps=2, batch_size=2, write_rank_digests=True)
    digests = torchrun_rank_digests("train-lm", dataclasses.asdict(cfg), tmp_path / "ddp")
    assert digests[0] == digests[1]


def test_generate_with_prompt_then_speak(tmp_path, capsys):
    """Batched speech continuation in three commands: `taste encode` the prompts, `taste generate --codes
    --with-prompt` (each row the whole continued utterance: the prompt's words and codes, then the new ones), and
    `taste speak` the rows."""
    from taste.corpus import read_wav
    from taste.voice import VoiceGenerator, VoiceGeneratorConfig

    stage1 = tiny_stage1()
    stage1.save_pretrained(str(tmp_path / "stage1"))
    lm = TasteSpokenLM.from_tokenizer(stage1.tokenizer, SpokenLMConfig.tiny())
    lm.save_pretrained(str(tmp_path / "lm"))
    VoiceGenerator(config=VoiceGeneratorConfig.tiny(num_units=16, spk_dim=80)).save_pretrained(str(tmp_path / "v"))
    (tmp_path / "spk.json").write_text(json.dumps([0.1] * 80))
    rows = []
    for k, text in enumerate(["hello there", "the cat sat down"]):
        t = torch.arange(12000 + 3000 * k) / 16000
        write_wav(str(tmp_path / f"p{k}.wav"), 0.3 * torch.sin(2 * torch.pi * (200 + 50 * k) * t))
        rows.append({"id": f"p{k}", "path": f"p{k}.wav", "text": text})
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["encode", str(tmp_path / "prompts.jsonl"), "--model", str(tmp_path / "stage1" / "tokenizer"), "-o",
                 str(tmp_path / "codes.jsonl"), "--quiet"]) == 0  # fmt: skip
    gen = ["generate", str(tmp_path / "lm"), "--codes", str(tmp_path / "codes.jsonl"), "--num", "2", "--greedy",
           "--extra-words", "2", "--max-new-tokens", "8"]  # fmt: skip
    assert main([*gen, "-o", str(tmp_path / "new.jsonl")]) == 0
    assert main([*gen, "--with-prompt", "-o", str(tmp_path / "whole.jsonl")]) == 0
    prompts = [json.loads(line) for line in (tmp_path / "codes.jsonl").read_text().splitlines()]
    new = [json.loads(line) for line in (tmp_path / "new.jsonl").read_text().splitlines()]
    whole = [json.loads(line) for line in (tmp_path / "whole.jsonl").read_text().splitlines()]
    for p, n, w in zip(prompts, new, whole):
        assert n["id"] == w["id"] == p["id"] and n["codebooks"] == w["codebooks"] == p["codebooks"]
        assert w["words"] == p["words"] + n["words"] and w["codes"] == p["codes"] + n["codes"]
        assert w["prompt_words"] == len(p["words"]) and "prompt_words" not in n
    capsys.readouterr()
    speak = ["speak", str(tmp_path / "whole.jsonl"), "--model", str(tmp_path / "stage1"), "--voice",
             str(tmp_path / "v"), "--speaker", str(tmp_path / "spk.json"), "-o", str(tmp_path / "wavs")]  # fmt: skip
    assert main(speak) == 0
    assert "2 wavs" in capsys.readouterr().out
    for k in range(2):
        wave, rate = read_wav(str(tmp_path / "wavs" / f"p{k}.wav"))
        assert rate == 22050 and wave.numel() > 0
    assert main(["generate", str(tmp_path / "lm"), "--prompt", "hi", "--with-prompt", "-o", str(tmp_path / "x")]) == 1
    assert "--with-prompt needs speech prompts (--codes)" in capsys.readouterr().err
