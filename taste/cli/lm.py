"""The spoken language model (TASLM): train, generate, continue speech, evaluate, score, merge LoRA."""

from __future__ import annotations

import json
import time

from taste.cli._common import (
    _add_eval_options,
    _add_sampling,
    _add_training,
    _device,
    _generation_config,
    _load_asr,
    _load_lm,
    _load_voice,
    _overrides,
    _read_centroids,
    _report,
    _speaker_encoder,
    _speaker_vector,
)


def cmd_train_lm(args) -> None:
    from taste.train_lm import LMTrainConfig, train_lm

    cfg = LMTrainConfig.from_json(args.config, **_overrides(args))
    train_lm(cfg, stop_after=args.stop_after, progress=not args.quiet)
    print(f"spoken LM: {cfg.out_dir}")


def cmd_generate(args) -> None:
    import torch

    from taste.continuation import generated_words, prompt_batch

    device = _device(args.device)
    lm = _load_lm(args.model, device)
    config = _generation_config(args)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.prompt and args.codes:
        raise ValueError("give text prompts (--prompt) or speech prompts (--codes), not both")
    if args.with_prompt and not args.codes:
        raise ValueError("--with-prompt needs speech prompts (--codes): text prompts have no codes")
    t = time.perf_counter()
    ids, prompt_codes = None, None
    if args.codes:  # speech prompts: words + TASTE codes of `taste encode` rows
        from taste.train_lm import CodeCorpus

        corpus = CodeCorpus.for_model(args.codes, lm)
        idx = list(range(min(args.num, len(corpus))))
        b = corpus.batch(idx, device)
        words = [corpus.words[i] for i in idx]
        ids = [corpus.ids[i] if corpus.ids[i] is not None else i for i in idx]
        prompt_codes = [corpus.codes[i] for i in idx]
        out = lm.generate(b["tokens"], b["cu_seqlens"], b["word_ids"], b["codes"], config=config, generator=generator)
    elif args.prompt:
        words = [p.split() for p in args.prompt]
        if any(not w for w in words):
            raise ValueError("every --prompt needs at least one word")
        tokens, cu, word_ids = prompt_batch(words, lm.config.llm_tokenizer)
        out = lm.generate(tokens, cu, word_ids, None, config=config, generator=generator)
    else:
        words = [[] for _ in range(args.num)]
        out = lm.generate(num_sequences=args.num, config=config, generator=generator)
    elapsed = time.perf_counter() - t
    rows = generated_words(lm, out)
    codebooks = lm.vq.codebook_digest()  # (as `taste encode` writes it: `taste speak` checks it)
    with open(args.output, "w") as f:
        for k, (prompt, (new, codes)) in enumerate(zip(words, rows)):
            row = {"id": ids[k] if ids else k, "prompt": " ".join(prompt), "words": new, "codes": codes.tolist(),
                   "codebooks": codebooks}  # fmt: skip
            if args.with_prompt:  # the prompt's words and codes first: the whole continued utterance
                row.update(words=[*prompt, *new], codes=torch.cat([prompt_codes[k], codes]).tolist(),
                           prompt_words=len(prompt))  # fmt: skip
            f.write(json.dumps(row) + "\n")
    n = sum(len(new) for new, _ in rows)
    print(f"{len(rows)} sequences, {n} words in {elapsed:.2f} s on {device} -> {args.output}")


def cmd_continue(args) -> None:
    from taste.continuation import continue_speech
    from taste.corpus import read_wav, write_wav
    from taste.train import Stage1Model

    if (args.centroids is None) == (args.voice is None):
        raise ValueError("give --centroids (k-means units of `taste units`) or --voice (S3 units: the release)")
    if (args.text is None) == (args.asr is None):
        raise ValueError("give --text (the prompt's transcript) or --asr (a Whisper checkpoint to transcribe it)")
    lm = _load_lm(args.lm, "cpu")
    stage1 = Stage1Model.from_pretrained(args.tokenizer_model).eval()
    audio, rate = read_wav(args.wav)
    centroids = _read_centroids(args.centroids) if args.centroids else None
    voice = _load_voice(args.voice, "cpu") if args.voice else None
    needs_encoder = not args.speaker or args.speaker.endswith(".wav")
    encoder = _speaker_encoder(args.speaker_model, args.voice, args.tokenizer_model) if needs_encoder else None
    if args.speaker:
        speaker = _speaker_vector(args.speaker, encoder)
    elif encoder is not None:  # as the official demo: the prompt's own CAM++ vector
        speaker = encoder.speaker([audio], rate)
        print("speaker: the prompt's CAM++ vector")
    else:
        speaker = None
    asr = _load_asr(args.asr, "cpu", None) if args.asr else None
    result = continue_speech(lm, stage1, audio, args.text, centroids, sample_rate=rate, config=_generation_config(args),
                             seed=args.seed, only_new=args.only_new, voice=voice, speaker=speaker,
                             asr=asr)  # fmt: skip
    write_wav(args.output, result["wave"], result["sample_rate"])
    print(f"prompt: {' '.join(result['prompt_words'])}\ncontinuation: {' '.join(result['new_words'])}\n"
          f"{result['units'].numel()} units -> {args.output} "
          f"({result['wave'].numel() / result['sample_rate']:.2f} s)")  # fmt: skip


def cmd_eval_lm(args) -> None:
    from taste.train_lm import CodeCorpus, evaluate_lm

    lm = _load_lm(args.model, _device(args.device))
    corpus = CodeCorpus.for_model(args.codes, lm)
    n = len(corpus)
    if not 0 < args.eval_size < n:
        raise ValueError(f"--eval-size must be in [1, {n - 1}] for {n} rows, got {args.eval_size}")
    metrics = evaluate_lm(lm, corpus, list(range(n - args.eval_size, n)), args.batch_size,
                          train_indices=list(range(n - args.eval_size)))  # fmt: skip
    _report(metrics, args.json)


def cmd_score_lm(args) -> None:
    from taste.checkpoint import write_jsonl_atomically
    from taste.train_lm import CodeCorpus, preference_accuracy, score_corpus

    lm = _load_lm(args.model, _device(args.device))
    scores = score_corpus(lm, CodeCorpus.for_model(args.codes, lm), args.batch_size, text_only=args.text_only)
    summary = {"rows": len(scores)}
    for key in ("text_logprob", "taste_logprob", "tokens", "words"):
        summary[f"mean_{key}"] = sum(r[key] for r in scores) / len(scores)
    if args.against:
        other = score_corpus(lm, CodeCorpus.for_model(args.against, lm), args.batch_size, text_only=args.text_only)
        if len(other) != len(scores):
            raise ValueError(f"--against {args.against} has {len(other)} rows, {args.codes} {len(scores)}: the "
                             "rows must pair up (row i: the right answer, against row i: the wrong one)")  # fmt: skip
        summary.update(preference_accuracy(scores, other, per_token=args.per_token))
        scores = [{**r, "against": o} for r, o in zip(scores, other)]
    if args.output:
        write_jsonl_atomically(args.output, scores)
    _report(summary, args.json)


def cmd_merge_lora(args) -> None:
    lm = _load_lm(args.model, "cpu")
    lm.merge_lora().save_pretrained(args.output, full=True)
    n = sum(p.numel() for p in lm.parameters()) / 1e6
    print(f"merged the LoRA adapters into the backbone: {n:.1f}M parameters -> {args.output}")


def register(sub) -> None:
    """Adds ``train-lm``, ``generate``, ``continue``, ``eval-lm``, ``score-lm``, ``merge-lora``."""
    _add_training(sub, "train-lm", "train the spoken LM (TASLM) on `taste encode` codes from a JSON config",
                  "taste.train_lm.LMTrainConfig", cmd_train_lm)  # fmt: skip

    g = sub.add_parser("generate", help="text + TASTE codes from the spoken LM (zero, text or speech prompts), batched")
    g.add_argument("model", help="a train-lm out_dir (or a TasteSpokenLM directory)")
    g.add_argument("--prompt", action="append", default=[], help="a text prompt (repeat for a batch)")
    g.add_argument("--codes", default=None, help="speech prompts: the first --num rows of a `taste encode` JSONL")
    g.add_argument("--num", type=int, default=4, help="sequences without --prompt (zero prompt, or --codes rows)")
    g.add_argument("-o", "--output", required=True, help="JSONL: id, prompt, words, codes (W x Q), codebooks (`taste "
                   "speak` turns the rows into speech)")  # fmt: skip
    g.add_argument("--with-prompt", action="store_true", help="with --codes: each row's words and codes begin with "
                   "its prompt's (the whole continued utterance, as the official demo speaks it)")  # fmt: skip
    g.add_argument("--device", default=None)
    _add_sampling(g)
    g.set_defaults(func=cmd_generate)

    k = sub.add_parser("continue", help="speech continuation: wav + transcript -> TASLM -> unit decoder -> wav "
                       "(Griffin-Lim from k-means units, or the voice generator from S3 units)")  # fmt: skip
    k.add_argument("wav")
    k.add_argument("--text", default=None, help="the prompt's transcript (or --asr)")
    k.add_argument("--asr", default=None, metavar="WHISPER_DIR", help="transcribe the prompt with this local Whisper "
                   "checkpoint (e.g. large-v3, as the official demo) on the tokenizer's encoder pass")  # fmt: skip
    k.add_argument("--lm", required=True, help="a train-lm out_dir")
    k.add_argument("--tokenizer-model", required=True, help="the stage 1-3 train-tokenizer out_dir")
    k.add_argument("--centroids", default=None, help="k-means units: the unit_centroids.safetensors of `taste units` "
                   "(Griffin-Lim, 16 kHz)")  # fmt: skip
    k.add_argument("--voice", default=None, help="S3 units (the release, `taste import-official`): its "
                   "voice generator, as `taste vocode --voice` (22.05 kHz)")  # fmt: skip
    k.add_argument("--speaker", default=None, help="speaker vector file (.json, .npy, .pt, .safetensors) or .wav "
                   "reference for the unit decoder and voice generator; the official ones take CAM++ vectors (192); "
                   "default: the prompt's CAM++ vector when a speaker model is found (--speaker-model, or "
                   "cosyvoice/speaker_embed.onnx in --voice / --tokenizer-model), else its mean unit "
                   "features")  # fmt: skip
    k.add_argument("--speaker-model", default=None, help="the CAM++ speaker encoder: the release directory, its "
                   "cosyvoice/speaker_embed.onnx, or CosyVoice's campplus.onnx")  # fmt: skip
    k.add_argument("--only-new", action="store_true", help="synthesise only the generated words")
    k.add_argument("-o", "--output", required=True)
    _add_sampling(k)
    k.set_defaults(func=cmd_continue)

    el = sub.add_parser("eval-lm", help="teacher-forced text and code metrics of a spoken LM on held-out rows")
    el.add_argument("model", help="a train-lm out_dir (or a TasteSpokenLM directory)")
    el.add_argument("codes", help="the `taste encode` JSONL it was trained on (the last --eval-size rows)")
    _add_eval_options(el)
    el.set_defaults(func=cmd_eval_lm)

    sc = sub.add_parser("score-lm", help="log-likelihoods of a spoken LM on every row of a codes file; with "
                        "--against, how often it prefers each row to its pair (spoken StoryCloze, SALMON)")  # fmt: skip
    sc.add_argument("model", help="a train-lm out_dir (or a TasteSpokenLM directory)")
    sc.add_argument("codes", help="a `taste encode` JSONL (with --against: the right answers)")
    sc.add_argument("--against", default=None, help="a `taste encode` JSONL of as many rows: the wrong answers")
    sc.add_argument("--per-token", action="store_true", help="compare the text per token and the codes per word")
    sc.add_argument("--text-only", action="store_true", help="score the text without its codes")
    sc.add_argument("--batch-size", type=int, default=16)
    sc.add_argument("--device", default=None)
    sc.add_argument("--output", "-o", default=None, help="write every row's scores here (JSONL)")
    sc.add_argument("--json", default=None, help="also write the summary here")
    sc.set_defaults(func=cmd_score_lm)

    m = sub.add_parser("merge-lora", help="fold a spoken LM's LoRA adapters into its backbone (full checkpoint)")
    m.add_argument("model", help="a train-lm out_dir (or a TasteSpokenLM directory)")
    m.add_argument("output")
    m.set_defaults(func=cmd_merge_lora)
