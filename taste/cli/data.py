"""Speech data: the espeak-ng corpus, k-means units, TASTE codes, Whisper transcripts, S3 units, speaker vectors."""

from __future__ import annotations

import json
import os
import sys
import time

from taste.cli._common import _device, _dtype, _load_asr, _speaker_encoder, _write_vector


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
    ``taste encode`` of the same manifest, model (path and codebooks) and ASR kept in ``path``
    (:func:`taste.checkpoint.open_journal`)."""
    from taste.checkpoint import open_journal

    header = {"taste_encode": 1, "manifest": os.path.abspath(args.manifest), "model": os.path.abspath(args.model),
              "dtype": args.dtype, "rows": len(rows), "codebooks": codebooks}  # fmt: skip
    if args.asr:  # (absent without it: the journals of earlier versions stay valid)
        header["asr"] = os.path.abspath(args.asr)
    # (a journal written before headers held the codebooks: its model path decides, and its codes are kept)
    done = open_journal(path, header, [row["id"] for row in rows], args.manifest, "encode",
                        defaults={"codebooks": codebooks})  # fmt: skip
    results = {i: record["codes"] for i, record in done.items()}
    return results, {i: record["text"] for i, record in done.items() if "text" in record}


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


def register(sub) -> None:
    """Adds ``corpus``, ``units``, ``encode``, ``transcribe``, ``s3-units``, ``speaker``."""
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
