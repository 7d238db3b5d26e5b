"""The ``taste`` command line.

taste corpus OUT_DIR --num N          speak built-in sentences with espeak-ng -> wavs + manifest.jsonl
taste units MANIFEST --k 256          50 Hz k-means units of log-mel frames -> MANIFEST.units.jsonl
taste init-tokenizer OUT_DIR          a seed TasteTokenizer (random preset, or --whisper LOCAL_DIR)
taste encode MANIFEST --model DIR -o codes.jsonl    batched TASTE codes, one row per word
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _dtype(name: str):
    """A --dtype choice as the torch dtype to cast to (None: float32, the models' own)."""
    import torch

    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_corpus(args) -> None:
    from taste.corpus import synthesize_corpus

    t = time.perf_counter()
    path = synthesize_corpus(args.out_dir, args.num, seed=args.seed, workers=args.workers, prosody=args.prosody)
    print(f"wrote {args.num} utterances and {path} in {time.perf_counter() - t:.1f} s")


def cmd_units(args) -> None:
    from taste.corpus import compute_units

    t = time.perf_counter()
    path = compute_units(args.manifest, args.k, iters=args.iters, n_mels=args.n_mels, seed=args.seed, out=args.out)
    print(f"wrote {path} and its unit_centroids.safetensors in {time.perf_counter() - t:.1f} s")


def cmd_init_tokenizer(args) -> None:
    import torch

    from taste.tokenizer import TasteConfig, TasteTokenizer

    torch.manual_seed(args.seed)
    if args.whisper:
        model = TasteTokenizer.from_whisper(
            args.whisper, value_layer=args.value_layer, asr_tokenizer=args.asr_tokenizer, language=args.language
        )
    else:
        model = TasteTokenizer(config=getattr(TasteConfig, args.preset)().with_asr_tokenizer(args.asr_tokenizer))
    model.save_pretrained(args.out_dir)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"wrote a {params:.1f} M-parameter TasteTokenizer to {args.out_dir}")


def cmd_encode(args) -> None:
    from tqdm import tqdm

    from taste._checks import check_positive_int
    from taste.checkpoint import write_jsonl_atomically
    from taste.corpus import name_manifest_rows, read_manifest, read_wav
    from taste.tokenizer import TasteTokenizer

    check_positive_int(args.batch_size, "--batch-size")
    device = _device(args.device)
    dtype = _dtype(args.dtype)
    model = TasteTokenizer.from_pretrained(args.model, device=device, dtype=dtype).eval()
    asr = _load_asr(args.asr, device, dtype) if args.asr else None
    rows = read_manifest(args.manifest, need_text=asr is None)
    journal = args.output + ".partial"
    codebooks = model.quantizer.codebook_digest()  # (beside each row's codes: see CodeCorpus)
    results, transcripts = _open_encode_journal(journal, args, rows, codebooks)
    if results and not args.quiet:
        print(f"resuming from {journal}: {len(results)} of {len(rows)} utterances already encoded")
    # Length-bucketed batches: sorting by duration keeps every batch's utterances alike.
    order = sorted((i for i in range(len(rows)) if i not in results), key=lambda i: rows[i].get("duration", 0.0))
    t, seconds = time.perf_counter(), 0.0
    with open(journal, "a") as log, tqdm(total=len(rows), initial=len(results), unit="utt", disable=args.quiet) as bar:
        for start in range(0, len(order), args.batch_size):
            batch = order[start : start + args.batch_size]
            audio = [read_wav(rows[i]["audio_path"]) for i in batch]
            seconds += sum(a.numel() / rate for a, rate in audio)
            waves, rates = [a for a, _ in audio], [r for _, r in audio]
            try:
                if asr is None:
                    texts = [rows[i]["text"] for i in batch]
                    codes = model.encode(waves, texts, rates)
                else:  # one encoder pass for the transcript and the codes
                    texts, codes = model.transcribe_and_encode(waves, asr, rates)
            except (TypeError, ValueError) as e:  # (bad values of the manifest's rows, whichever kind)
                raise ValueError(name_manifest_rows(str(e), [rows[i]["id"] for i in batch], args.manifest)) from e
            for i, c, text in zip(batch, codes, texts):
                results[i] = c.tolist()
                record = {"index": i, "id": rows[i]["id"], "codes": results[i]}
                if asr is not None:
                    transcripts[i] = record["text"] = text.strip()
                log.write(json.dumps(record) + "\n")
            log.flush()  # a batch encoded is a batch kept, whatever stops the command later
            bar.update(len(batch))
            bar.set_postfix(rtf=f"{(time.perf_counter() - t) / max(seconds, 1e-9):.4f}")

    def output_row(i: int, row: dict) -> dict:
        text = transcripts[i] if asr is not None else row["text"]
        out = {"id": row["id"], "words": text.split(), "codes": results[i], "codebooks": codebooks}
        return {**out, "text": text} if asr is not None else out

    write_jsonl_atomically(args.output, (output_row(i, r) for i, r in enumerate(rows)))
    os.remove(journal)
    elapsed = time.perf_counter() - t
    print(
        f"encoded {len(order)} utterances ({seconds:.1f} s of audio) in {elapsed:.1f} s on {device}: "
        f"{len(order) / elapsed:.1f} utt/s, real-time factor {elapsed / max(seconds, 1e-9):.4f}"
        + (f"; {len(rows) - len(order)} resumed from the journal" if len(order) < len(rows) else "")
        + f" -> {args.output}"
    )


def _open_encode_journal(path: str, args, rows: list[dict], codebooks: str) -> tuple[dict[int, list], dict[int, str]]:
    """The codes (index -> codes) and, with ``--asr``, the transcripts (index -> text) that an interrupted
    ``taste encode`` of the same manifest, model (path and codebooks) and ASR kept in ``path``, after rewriting the
    journal without a line the interruption left half-written; a fresh journal if none."""
    from taste.checkpoint import read_jsonl_records, write_jsonl_atomically

    header = {"taste_encode": 1, "manifest": os.path.abspath(args.manifest), "model": os.path.abspath(args.model),
              "dtype": args.dtype, "rows": len(rows), "codebooks": codebooks}  # fmt: skip
    if args.asr:  # (absent without it: the journals of earlier versions stay valid)
        header["asr"] = os.path.abspath(args.asr)
    records = read_jsonl_records(path) if os.path.exists(path) else []  # a header cut short leaves no records
    # (a journal written before headers held the codebooks: its model path decides, and its codes are kept)
    written = {"codebooks": codebooks, **records[0]} if records else {}
    if len(records) > 1 and written != header:  # (a journal of nothing encoded yet is simply started again)
        changed = sorted(k for k in header if written.get(k) != header[k])
        raise RuntimeError(f"{path} is the journal of another encode (it differs in {', '.join(changed)}); "
                           "delete it to start over, or rerun the command that wrote it")  # fmt: skip
    results: dict[int, list] = {}
    transcripts: dict[int, str] = {}
    for record in records[1:]:
        i = record["index"]
        if not 0 <= i < len(rows) or rows[i]["id"] != record["id"]:
            raise RuntimeError(f"{path}: row {i} is {record['id']!r} there but not in {args.manifest}; delete it")
        results[i] = record["codes"]
        if "text" in record:
            transcripts[i] = record["text"]
    write_jsonl_atomically(path, [header, *records[1:]])  # (the header of this encode, whatever was there)
    return results, transcripts


def _load_asr(path: str, device: str, dtype, encoder: bool = False):
    """A WhisperTranscriber from a local Whisper checkpoint directory."""
    from taste.asr import WhisperTranscriber

    return WhisperTranscriber.from_whisper(path, encoder=encoder, device=device, dtype=dtype).eval()


def cmd_transcribe(args) -> None:
    from tqdm import tqdm

    from taste._checks import check_positive_int
    from taste.checkpoint import write_jsonl_atomically
    from taste.corpus import manifest_rows_for, name_manifest_rows, read_manifest, read_wav

    check_positive_int(args.batch_size, "--batch-size")
    device = _device(args.device)
    dtype = _dtype(args.dtype)
    asr = _load_asr(args.whisper, device, dtype, encoder=True)
    rows = read_manifest(args.manifest, need_text=False)
    out = args.output or os.path.splitext(args.manifest)[0] + ".asr.jsonl"
    t, seconds, texts = time.perf_counter(), 0.0, {}
    order = sorted(range(len(rows)), key=lambda i: rows[i].get("duration", 0.0))  # (alike lengths per batch)
    with tqdm(total=len(rows), unit="utt", disable=args.quiet) as bar:
        for start in range(0, len(order), args.batch_size):
            batch = order[start : start + args.batch_size]
            audio = [read_wav(rows[i]["audio_path"]) for i in batch]
            seconds += sum(a.numel() / rate for a, rate in audio)
            try:
                heard = asr.transcribe([a for a, _ in audio], [r for _, r in audio], batch_size=args.batch_size)
            except (TypeError, ValueError) as e:
                raise ValueError(name_manifest_rows(str(e), [rows[i]["id"] for i in batch], args.manifest)) from e
            texts.update(zip(batch, (text.strip() for text in heard)))
            bar.update(len(batch))

    def with_transcript(i: int, row: dict) -> dict:
        reference = {"reference_text": row["text"]} if "text" in row else {}
        return {**{k: v for k, v in row.items() if k != "text"}, "text": texts[i], **reference}

    write_jsonl_atomically(out, manifest_rows_for(out, (with_transcript(i, r) for i, r in enumerate(rows))))
    elapsed = time.perf_counter() - t
    print(f"transcribed {len(rows)} utterances ({seconds:.1f} s of audio) in {elapsed:.1f} s on {device}: real-time "
          f"factor {elapsed / max(seconds, 1e-9):.4f} -> {out}")  # fmt: skip
    scored = [i for i, r in enumerate(rows) if "text" in r]
    if scored:  # the manifest's own transcripts as references (resynthesised speech, say)
        from taste.asr import word_error_rate

        wer = word_error_rate([rows[i]["text"] for i in scored], [texts[i] for i in scored])
        print(f"WER against the manifest's text ({wer['utterances']} utterances, Whisper's English normalizer): "
              f"{100 * wer['wer']:.2f}% ({wer['substitutions']} substitutions, {wer['deletions']} deletions, "
              f"{wer['insertions']} insertions over {wer['reference_words']} words)")  # fmt: skip
        if args.json:
            with open(args.json, "w") as f:
                json.dump(wer, f, indent=2)


def cmd_train_tokenizer(args) -> None:
    from taste.train import TrainConfig, train

    cfg = TrainConfig.from_json(args.config, **_overrides(args))
    train(cfg, stop_after=args.stop_after, progress=not args.quiet)
    print(f"stage {cfg.stage}: {cfg.out_dir}")


def _report(metrics: dict, json_path: str | None) -> None:
    print(json.dumps(metrics, indent=2))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(metrics, f, indent=2)


def cmd_eval_tokenizer(args) -> None:
    from taste.evaluate import evaluate

    metrics = evaluate(args.model, args.manifest, eval_size=args.eval_size, batch_size=args.batch_size,
                       seed=args.seed, device=args.device)  # fmt: skip
    _report(metrics, args.json)


def _read_centroids(path: str):
    """The ``centroids`` tensor of a ``taste units`` output file."""
    from taste.checkpoint import read_tensors

    tensors = read_tensors(path)
    if "centroids" not in tensors:
        raise ValueError(f"{path} holds no 'centroids' tensor (got {sorted(tensors)[:5]}): not a `taste units` file")
    return tensors["centroids"]


def cmd_resynthesize(args) -> None:
    from taste.corpus import read_wav, write_wav
    from taste.evaluate import resynthesize

    audio, rate = read_wav(args.wav)
    centroids = _read_centroids(args.centroids)
    codes, wave = resynthesize(args.model, audio, args.text, centroids, seed=args.seed, sample_rate=rate)
    write_wav(args.output, wave)
    print(f"{codes.shape[0]} words, codes {codes.tolist()} -> {args.output} ({wave.numel() / 16000:.2f} s)")


def cmd_reconstruct(args) -> None:
    from taste._checks import check_positive_int
    from taste.evaluate import _stage
    from taste.reconstruct import reconstruct_manifest
    from taste.train import Stage1Model

    check_positive_int(args.batch_size, "--batch-size")
    if args.max_units is not None:
        check_positive_int(args.max_units, "--max-units")
    if (args.centroids is None) == (args.voice is None):
        raise ValueError("give --centroids (k-means units of `taste units`) or --voice (S3 units: the release)")
    device = _device(args.device)
    stage1 = Stage1Model.from_pretrained(args.model, device=device).eval()
    if args.dtype != "float32":  # (the tokenizer's encoder and aggregator, as the release ships them)
        stage1.tokenizer.to_precision(dtype=_dtype(args.dtype))
    centroids = _read_centroids(args.centroids) if args.centroids else None
    voice = _load_voice(args.voice, device) if args.voice else None
    encoder = _speaker_encoder(args.speaker_model, args.voice, args.model)
    speaker = _speaker_vector(args.speaker, encoder) if args.speaker else None
    asr = _load_asr(args.asr, device, _dtype(args.dtype)) if args.asr else None
    run = {"model": os.path.abspath(args.model), "dtype": args.dtype, "speaker": args.speaker,
           "vocoder": os.path.abspath(args.voice or args.centroids)}  # fmt: skip
    if args.asr:
        run["asr"] = os.path.abspath(args.asr)
    summary = reconstruct_manifest(
        stage1, args.manifest, args.out_dir, voice=voice, centroids=centroids, asr=asr, speaker=speaker,
        speaker_encoder=encoder, stage=_stage(args.model), batch_size=args.batch_size, seed=args.seed,
        greedy=args.greedy, top_k=args.top_k, max_new_tokens=args.max_units, run=run, progress=not args.quiet,
    )  # fmt: skip
    s = summary
    made = s["utterances"] - s["resumed"]
    print(f"reconstructed {made} utterances ({s['source_seconds']:.1f} s of audio in all) in {s['elapsed_s']:.1f} s on "
          f"{device}" + (f"; {s['resumed']} resumed from the journal" if s["resumed"] else "")
          + f" -> {os.path.join(args.out_dir, 'manifest.jsonl')}")  # fmt: skip
    print(f"duration: {s['seconds']:.1f} s made for {s['source_seconds']:.1f} s (mean ratio {s['duration_ratio']:.3f}, "
          f"mean |error| {100 * s['duration_abs_rel_error']:.1f}%)")  # fmt: skip
    if "speaker_similarity" in s:
        print(f"speaker similarity (CAM++ cosine, source against reconstruction): {s['speaker_similarity']:.4f}")
    print(f"WER: taste transcribe {os.path.join(args.out_dir, 'manifest.jsonl')} --whisper DIR")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


def cmd_train_lm(args) -> None:
    from taste.train_lm import LMTrainConfig, train_lm

    cfg = LMTrainConfig.from_json(args.config, **_overrides(args))
    train_lm(cfg, stop_after=args.stop_after, progress=not args.quiet)
    print(f"spoken LM: {cfg.out_dir}")


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


def _load_lm(path: str, device: str):
    from taste.spoken_lm import TasteSpokenLM

    return TasteSpokenLM.from_pretrained(path, device=device).eval()


def cmd_generate(args) -> None:
    import torch

    from taste.continuation import generated_words, prompt_batch

    device = _device(args.device)
    lm = _load_lm(args.model, device)
    config = _generation_config(args)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.prompt and args.codes:
        raise ValueError("give text prompts (--prompt) or speech prompts (--codes), not both")
    t = time.perf_counter()
    if args.codes:  # speech prompts: words + TASTE codes of `taste encode` rows
        from taste.train_lm import CodeCorpus

        corpus = CodeCorpus.for_model(args.codes, lm)
        idx = list(range(min(args.num, len(corpus))))
        b = corpus.batch(idx, device)
        words = [corpus.words[i] for i in idx]
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
    with open(args.output, "w") as f:
        for prompt, (new, codes) in zip(words, rows):
            f.write(json.dumps({"prompt": " ".join(prompt), "words": new, "codes": codes.tolist()}) + "\n")
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


def cmd_s3_units(args) -> None:
    from tqdm import tqdm

    from taste._checks import check_positive_int
    from taste.corpus import read_manifest, read_wav, write_manifest
    from taste.s3_tokenizer import TOKEN_RATE, S3Tokenizer

    check_positive_int(args.num_units, "--num-units")
    device = _device(args.device)
    tokenizer = S3Tokenizer.from_official(args.model, device=device)
    encoder = _speaker_encoder(args.speaker_model) if args.speaker_model else None
    if args.batch_frames is not None:
        check_positive_int(args.batch_frames, "--batch-frames")
    rows = read_manifest(args.manifest)
    t, seconds = time.perf_counter(), 0.0
    group = 1 if args.batch_frames is None else 256  # rows read (and batched by length) together
    progress = tqdm(total=len(rows), desc="s3 units", disable=not sys.stderr.isatty())
    for start in range(0, len(rows), group):
        part = rows[start : start + group]
        audios, rates = zip(*(read_wav(row["audio_path"]) for row in part))
        try:
            units = tokenizer.encode(list(audios), list(rates), batch_frames=args.batch_frames)
        except ValueError:
            units = None  # the failing row is named below
        for i, (row, audio, rate) in enumerate(zip(part, audios, rates)):
            try:
                row_units = tokenizer.encode([audio], rate)[0] if units is None else units[i]
                if encoder is not None:
                    row["speaker"] = [round(v, 7) for v in encoder.speaker([audio], rate).tolist()]
            except ValueError as e:
                raise ValueError(f"row {row['id']!r} ({row['path']}): {e}") from None
            if row_units.numel() and int(row_units.max()) >= args.num_units:
                raise ValueError(f"row {row['id']!r}: token {int(row_units.max())} is not below --num-units "
                                 f"{args.num_units}")  # fmt: skip
            row.update(units=row_units.tolist(), unit_rate=TOKEN_RATE, num_units=args.num_units)
            seconds += audio.numel() / rate
        progress.update(len(part))
    progress.close()
    out = args.output or os.path.splitext(args.manifest)[0] + ".s3.jsonl"
    write_manifest(out, rows)
    speakers = " and CAM++ speaker vectors" if encoder is not None else ""
    print(f"S3 units{speakers} of {len(rows)} utterances ({seconds:.1f} s of audio) in "
          f"{time.perf_counter() - t:.1f} s -> {out}")  # fmt: skip


def cmd_speaker(args) -> None:
    from taste.corpus import read_wav

    encoder = _speaker_encoder(args.model)
    audios, rates = zip(*(read_wav(p) for p in args.wavs))
    vector = encoder.speaker(list(audios), list(rates), max_seconds=args.max_seconds)
    _write_vector(args.output, vector)
    print(f"speaker vector ({vector.numel()}) of {len(args.wavs)} reference(s) -> {args.output}")


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


def cmd_vocode(args) -> None:
    import torch

    from taste._checks import check_positive_int
    from taste.checkpoint import iter_json_objects
    from taste.corpus import write_wav

    check_positive_int(args.batch_size, "--batch-size")
    device = _device(args.device)
    t = time.perf_counter()
    gen = _load_voice(args.voice, device)
    loaded = time.perf_counter() - t
    if args.speaker:
        wav = args.speaker.endswith(".wav")
        default = _speaker_vector(args.speaker, _speaker_encoder(args.speaker_model, args.voice) if wav else None)
    else:
        default = torch.zeros(gen.config.spk_dim)
    rows = []
    for where, row in iter_json_objects(args.units, "units rows"):
        units = row.get("units")
        if not isinstance(units, list) or not units or not all(isinstance(u, int) for u in units):
            raise ValueError(f"{where}: 'units' must be a non-empty list of integer ids")
        speaker = torch.tensor(row["speaker"], dtype=torch.float32) if "speaker" in row else default
        if speaker.shape != (gen.config.spk_dim,):
            raise ValueError(f"{where}: the speaker vector must have {gen.config.spk_dim} values, got "
                             f"{tuple(speaker.shape)}")  # fmt: skip
        name = str(row.get("id", len(rows)))
        if not name or os.sep in name or name in (".", ".."):
            raise ValueError(f"{where}: the id {name!r} cannot name a file")
        rows.append((name, torch.tensor(units), speaker))
    names = [name for name, _, _ in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"{args.units}: two rows have the same id: each becomes <id>.wav")
    os.makedirs(args.output, exist_ok=True)
    generator, t, seconds = torch.Generator().manual_seed(args.seed), time.perf_counter(), 0.0
    for lo in range(0, len(rows), args.batch_size):
        part = rows[lo : lo + args.batch_size]
        speaker = torch.stack([s for _, _, s in part])
        waves = gen.generate([u for _, u, _ in part], speaker, generator=generator)
        for (name, _, _), wave in zip(part, waves):
            write_wav(os.path.join(args.output, f"{name}.wav"), wave.float().cpu(), gen.sample_rate)
            seconds += wave.numel() / gen.sample_rate
    elapsed = time.perf_counter() - t
    print(f"{len(rows)} wavs, {seconds:.1f} s of speech in {elapsed:.1f} s on {device} (loaded in {loaded:.1f} s) "
          f"-> {args.output}")  # fmt: skip


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


def environment() -> dict:
    """What this installation has: versions, the compiled extension and its GPU architectures, the GPUs and whether
    the extension has code for each, and the optional pieces (tokenizer files, espeak-ng, transformers, peft)."""
    import importlib.metadata
    import platform
    import shutil

    import torch
    import triton

    import taste
    from taste import ops
    from taste.text import _package_file

    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    def package_file(package, relative):
        try:
            return bool(_package_file(package, relative, package))
        except (ModuleNotFoundError, FileNotFoundError):
            return False

    gpus = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        major, minor = torch.cuda.get_device_capability(i)
        gpus.append({"index": i, "name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}",
                     "extension_has_code": ops.cuda_arch_covers((major, minor))})  # fmt: skip
    return {
        "taste": taste.__version__,
        "location": os.path.dirname(taste.__file__),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton.__version__,
        "extension": ops.HAS_EXTENSION,
        "extension_cuda_arch_list": ops.CUDA_ARCH_LIST,
        "gpus": gpus,
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "whisper_tokenizer_files": package_file("whisper", "assets/multilingual.tiktoken"),
        "llama3_tokenizer_file": package_file("llama_models", "llama3/tokenizer.model"),
        "espeak_ng": shutil.which("espeak-ng"),
        "transformers": version("transformers"),
        "peft": version("peft"),
        "safetensors": version("safetensors"),
    }


def cmd_info(args) -> None:
    info = environment()
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key != "gpus":
            print(f"{key}: {value}")
    if not info["gpus"]:
        print("gpus: none visible")
    for gpu in info["gpus"]:
        has = {True: "yes", False: "NO: rebuild with TORCH_CUDA_ARCH_LIST=" + gpu["capability"], None: "unknown"}
        verdict = has[gpu["extension_has_code"]]
        if not info["extension"] or info["extension_cuda_arch_list"] is None:
            verdict = "no, the build has no CUDA kernels: the ops run their PyTorch references on it"
        print(f"gpu {gpu['index']}: {gpu['name']}, compute capability {gpu['capability']}, extension has code for it: "
              f"{verdict}")  # fmt: skip


def cmd_import_official(args) -> None:
    from taste.official import import_official

    for part, path in import_official(args.checkpoint, args.output, args.parts).items():
        print(f"{part}: {path}")


def cmd_merge_lora(args) -> None:
    lm = _load_lm(args.model, "cpu")
    lm.merge_lora().save_pretrained(args.output, full=True)
    n = sum(p.numel() for p in lm.parameters()) / 1e6
    print(f"merged the LoRA adapters into the backbone: {n:.1f}M parameters -> {args.output}")


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="taste", description="TASTE speech tokenization and the TASLM spoken language model"
    )
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("corpus", help="synthesise a speech corpus with espeak-ng")
    c.add_argument("out_dir")
    c.add_argument("--num", type=int, default=100, help="number of utterances (default 100)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--workers", type=int, default=4, help="espeak-ng processes in parallel")
    c.add_argument("--prosody", action="store_true", help="random rate, pitch and pauses per word (SSML)")
    c.set_defaults(func=cmd_corpus)

    u = sub.add_parser("units", help="50 Hz discrete units by k-means over log-mel frames")
    u.add_argument("manifest")
    u.add_argument("--k", type=int, default=256, help="number of units (default 256)")
    u.add_argument("--iters", type=int, default=30, help="Lloyd iterations (default 30)")
    u.add_argument("--n-mels", type=int, default=80, choices=(80, 128))
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("-o", "--out", default=None, help="output manifest (default MANIFEST.units.jsonl)")
    u.set_defaults(func=cmd_units)

    i = sub.add_parser("init-tokenizer", help="write a seed TasteTokenizer (save_pretrained layout)")
    i.add_argument("out_dir")
    i.add_argument("--preset", choices=("tiny", "official"), default="tiny", help="random weights of this shape")
    i.add_argument("--whisper", default=None, help="local Whisper checkpoint directory to seed from instead")
    i.add_argument("--value-layer", type=int, default=6)
    queries = (
        "the text queries' tokenizer: whisper (default), llama3 or a local tokenizer directory; another than whisper "
        "gets the aggregator's embedding in its vocabulary (from --whisper: each token starts as the mean of the "
        "Whisper rows that spell it)"
    )
    i.add_argument("--asr-tokenizer", default="whisper", help=queries)
    i.add_argument(
        "--language", default="en", help="with --whisper: the language token of the prefix (en, de, fr, ...)"
    )
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(func=cmd_init_tokenizer)

    e = sub.add_parser("encode", help="TASTE codes for every utterance of a manifest")
    e.add_argument("manifest")
    e.add_argument("--model", required=True, help="a TasteTokenizer.save_pretrained directory")
    journal = "OUTPUT.partial keeps every finished batch's codes; rerun an interrupted command to resume from it"
    e.add_argument("-o", "--output", required=True, help=f"JSONL: id, words, codes (W x Q); {journal}")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--asr", default=None, metavar="WHISPER_DIR",
                   help="transcripts from this local Whisper checkpoint (e.g. large-v3, as the official inference), "
                   "read from the model's own encoder pass, in place of the manifest's text; its transcripts go "
                   "to the output's text field")  # fmt: skip
    e.set_defaults(func=cmd_encode)

    tr = sub.add_parser("transcribe", help="Whisper transcripts of a manifest's audio (batched greedy decoding)")
    tr.add_argument("manifest", help="JSONL rows with id and path (audio); a text field is kept as reference_text")
    tr.add_argument("--whisper", required=True, help="a local Whisper checkpoint directory (transformers layout)")
    tr.add_argument("-o", "--output", default=None, help="the manifest with the transcripts as text (default "
                    "MANIFEST.asr.jsonl)")  # fmt: skip
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    tr.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    tr.add_argument("--json", default=None, help="write the WER against the manifest's text (where rows have one)")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_transcribe)

    _add_training(sub, "train-tokenizer", "stage-1 training (text / no_vq / vq) from a JSON config",
                  "taste.train.TrainConfig", cmd_train_tokenizer)  # fmt: skip

    v = sub.add_parser("eval-tokenizer", help="unit accuracy, bitrate and duration consistency on held-out rows")
    v.add_argument("model", help="a train-tokenizer out_dir (or its final/)")
    v.add_argument("manifest", help="the units manifest it was trained on (the last --eval-size rows)")
    v.add_argument("--seed", type=int, default=0)
    _add_eval_options(v)
    v.set_defaults(func=cmd_eval_tokenizer)

    r = sub.add_parser("resynthesize", help="wav + transcript -> TASTE codes -> units -> Griffin-Lim wav")
    r.add_argument("wav")
    r.add_argument("--text", required=True)
    r.add_argument("--model", required=True, help="a train-tokenizer out_dir")
    r.add_argument("--centroids", required=True, help="the unit_centroids.safetensors of `taste units`")
    r.add_argument("-o", "--output", required=True)
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=cmd_resynthesize)

    rc = sub.add_parser("reconstruct", help="speech -> TASTE codes -> unit decoder -> speech for every utterance of a "
                        "manifest, batched (the official inference_reconstruction)")  # fmt: skip
    rc.add_argument("manifest", help="JSONL rows with id, path (audio) and text (unless --asr)")
    rc.add_argument("--model", required=True, help="a stage-1 model: a train-tokenizer out_dir, or `taste "
                    "import-official`'s directory (tokenizer/ + unit_decoder/)")  # fmt: skip
    rc.add_argument("--voice", default=None, help="S3 units: the release (or its cosyvoice/voice_generator.pth, or a "
                    "saved VoiceGenerator)")  # fmt: skip
    rc.add_argument("--centroids", default=None, help="k-means units: the unit_centroids.safetensors of `taste units`")
    rc.add_argument("--asr", default=None, help="a Whisper checkpoint sharing the tokenizer's encoder (large-v3 or "
                    "distil-large-v3 for the release): transcribe in the tokenizer's encoder pass; a row's text stays "
                    "the reference")  # fmt: skip
    rc.add_argument("--speaker", default=None, help="one speaker vector for all rows (a .json/.npy/.safetensors/.pt "
                    "vector, or a .wav reference); default: a row's speaker vector, else each utterance's own CAM++ "
                    "vector (as the official reconstruction), else its mean unit features")  # fmt: skip
    rc.add_argument("--speaker-model", default=None, help="the CAM++ ONNX file or a directory holding it (default: "
                    "looked for under --voice and --model); also scores speaker similarity")  # fmt: skip
    rc.add_argument("-o", "--out-dir", required=True, help="wavs/<id>.wav and manifest.jsonl go here")
    rc.add_argument("--batch-size", type=int, default=8)
    rc.add_argument("--seed", type=int, default=0)
    rc.add_argument("--greedy", action="store_true", help="argmax units instead of the decoder's top-k sampling")
    rc.add_argument("--top-k", type=int, default=None, help="default: the unit decoder's (25 for the release)")
    rc.add_argument("--max-units", type=int, default=None, help="at most this many units per utterance (default: "
                    "the decoder's bound, a multiple of the text's tokens)")  # fmt: skip
    rc.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    rc.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="the tokenizer's encoder and aggregator (and the ASR)")  # fmt: skip
    rc.add_argument("--json", default=None, help="write the summary here")
    rc.add_argument("--quiet", action="store_true", help="no progress bar")
    rc.set_defaults(func=cmd_reconstruct)

    _add_training(sub, "train-lm", "train the spoken LM (TASLM) on `taste encode` codes from a JSON config",
                  "taste.train_lm.LMTrainConfig", cmd_train_lm)  # fmt: skip

    g = sub.add_parser("generate", help="text + TASTE codes from the spoken LM (zero, text or speech prompts), batched")
    g.add_argument("model", help="a train-lm out_dir (or a TasteSpokenLM directory)")
    g.add_argument("--prompt", action="append", default=[], help="a text prompt (repeat for a batch)")
    g.add_argument("--codes", default=None, help="speech prompts: the first --num rows of a `taste encode` JSONL")
    g.add_argument("--num", type=int, default=4, help="sequences without --prompt (zero prompt, or --codes rows)")
    g.add_argument("-o", "--output", required=True, help="JSONL: prompt, words, codes (W x Q)")
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

    inf = sub.add_parser("info", help="versions, the compiled extension, GPUs and optional pieces (for bug reports)")
    inf.add_argument("--json", action="store_true", help="print JSON")
    inf.set_defaults(func=cmd_info)

    vo = sub.add_parser("vocode", help="S3 units -> 22.05 kHz wavs with the flow-matching decoder + HiFT vocoder")
    vo.add_argument("units", help="JSONL, a row per utterance: 'units' (S3 ids), optional 'id' and 'speaker' "
                    "(its CAM++ vector)")  # fmt: skip
    vo.add_argument("--voice", required=True, help="the release (cosyvoice/voice_generator.pth), that file, a "
                    "CosyVoice model directory (flow.pt + hift.pt) or a VoiceGenerator.save_pretrained "
                    "directory")  # fmt: skip
    vo.add_argument("-o", "--output", required=True, help="directory: one <id>.wav per row")
    vo.add_argument("--speaker", default=None, help="a .json list, .npy, .pt or .safetensors vector, or a .wav "
                    "reference (its CAM++ vector), for rows without one (default: zeros)")  # fmt: skip
    vo.add_argument("--speaker-model", default=None, help="the CAM++ ONNX file (or a directory holding one) for a "
                    ".wav --speaker; default: the one in --voice's directory")  # fmt: skip
    vo.add_argument("--batch-size", type=int, default=8)
    vo.add_argument("--seed", type=int, default=0)
    vo.add_argument("--device", default=None)
    vo.set_defaults(func=cmd_vocode)

    s3 = sub.add_parser("s3-units", help="a manifest's audio -> S3 units (the release's speech_tokenizer_v1.onnx) "
                        "and optionally CAM++ speaker vectors: the official unit decoder's training data")  # fmt: skip
    s3.add_argument("manifest", help="JSONL rows with id, path (audio) and text (`taste corpus` writes one)")
    s3.add_argument("--model", required=True, help="the release directory (cosyvoice/speech_tokenizer_v1.onnx), "
                    "that file, or a CosyVoice model directory")  # fmt: skip
    s3.add_argument("--speaker-model", default=None, help="also write each row's CAM++ speaker vector ('speaker'), "
                    "which train-tokenizer then takes: the release directory or its speaker_embed.onnx")  # fmt: skip
    s3.add_argument("--num-units", type=int, default=4096, help="the tokenizer's vocabulary (v1: 4096)")
    s3.add_argument("--batch-frames", type=int, default=None, help="run utterances of similar length together, "
                    "padded, up to this many log-mel frames (100 a second) per call (checked against lone runs on "
                    "the graph first); default: each alone, as the official code")  # fmt: skip
    s3.add_argument("-o", "--output", default=None, help="default: <manifest>.s3.jsonl")
    s3.add_argument("--device", default=None)
    s3.set_defaults(func=cmd_s3_units)

    sp = sub.add_parser("speaker", help="reference wavs of one speaker -> its CAM++ speaker vector (as the official "
                        "processor: mean of the embeddings, unit length)")  # fmt: skip
    sp.add_argument("wavs", nargs="+", help="reference recordings of one speaker (any rate; resampled to 16 kHz)")
    sp.add_argument("--model", required=True, help="the release directory (cosyvoice/speaker_embed.onnx), that "
                    "file, CosyVoice's campplus.onnx, or an import-official directory")  # fmt: skip
    sp.add_argument("-o", "--output", required=True, help=".json, .npy, .safetensors or .pt (what --speaker reads)")
    sp.add_argument("--max-seconds", type=float, default=None, help="use only each reference's first seconds")
    sp.set_defaults(func=cmd_speaker)

    io = sub.add_parser("import-official", help="the released TASTE / TASLM checkpoint -> save_pretrained directories")
    io.add_argument("checkpoint", help="a local copy of MediaTek-Research/Llama-1B-TASTE-V0")
    io.add_argument("-o", "--output", required=True, help="writes OUTPUT/<part> for each part")
    io.add_argument("--parts", nargs="+", default=["tokenizer", "unit_decoder", "spoken_lm"],
                    choices=("tokenizer", "unit_decoder", "spoken_lm", "voice", "speaker", "s3_tokenizer"),
                    help="voice: cosyvoice/voice_generator.pth (S3 units -> speech); speaker: "
                    "cosyvoice/speaker_embed.onnx (CAM++ speaker vectors); s3_tokenizer: "
                    "cosyvoice/speech_tokenizer_v1.onnx; when the directory has them")  # fmt: skip
    io.set_defaults(func=cmd_import_official)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from taste.trainer import TrainingInterrupted

    try:
        args.func(args)
    except TrainingInterrupted as e:  # pre-empted: the checkpoint is saved; exit as the signal would have
        print(f"taste {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except (RuntimeError, ValueError, FloatingPointError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"taste {args.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Under torchrun, the training commands join a process group (``taste.trainer.setup_distributed``); leaving it
    before the interpreter exits keeps the backend's threads from being torn down mid-exit (gloo can abort then)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
