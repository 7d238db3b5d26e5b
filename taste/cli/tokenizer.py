"""The TASTE tokenizer and unit decoder (stage 1): seed, train, evaluate, and speech through them and back."""

from __future__ import annotations

import json
import os

from taste.cli._common import (
    _add_eval_options,
    _add_training,
    _device,
    _dtype,
    _load_asr,
    _load_voice,
    _overrides,
    _read_centroids,
    _report,
    _speaker_encoder,
    _speaker_vector,
)


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


def cmd_train_tokenizer(args) -> None:
    from taste.train import TrainConfig, train

    cfg = TrainConfig.from_json(args.config, **_overrides(args))
    train(cfg, stop_after=args.stop_after, progress=not args.quiet)
    print(f"stage {cfg.stage}: {cfg.out_dir}")


def cmd_eval_tokenizer(args) -> None:
    from taste.evaluate import evaluate

    metrics = evaluate(args.model, args.manifest, eval_size=args.eval_size, batch_size=args.batch_size,
                       seed=args.seed, device=args.device)  # fmt: skip
    _report(metrics, args.json)


def cmd_resynthesize(args) -> None:
    from taste.corpus import read_wav, write_wav
    from taste.evaluate import resynthesize

    audio, rate = read_wav(args.wav)
    centroids = _read_centroids(args.centroids)
    codes, wave = resynthesize(args.model, audio, args.text, centroids, seed=args.seed, sample_rate=rate)
    write_wav(args.output, wave)
    print(f"{codes.shape[0]} words, codes {codes.tolist()} -> {args.output} ({wave.numel() / 16000:.2f} s)")


def _synthesis_models(args):
    """``(device, stage-1 model, centroids, voice generator)`` of ``reconstruct`` / ``speak``'s options, checked."""
    from taste._checks import check_positive_int
    from taste.train import Stage1Model

    check_positive_int(args.batch_size, "--batch-size")
    if args.max_units is not None:
        check_positive_int(args.max_units, "--max-units")
    if (args.centroids is None) == (args.voice is None):
        raise ValueError("give --centroids (k-means units of `taste units`) or --voice (S3 units: the release)")
    device = _device(args.device)
    stage1 = Stage1Model.from_pretrained(args.model, device=device).eval()
    centroids = _read_centroids(args.centroids) if args.centroids else None
    voice = _load_voice(args.voice, device) if args.voice else None
    return device, stage1, centroids, voice


def cmd_reconstruct(args) -> None:
    from taste.evaluate import _stage
    from taste.reconstruct import reconstruct_manifest

    device, stage1, centroids, voice = _synthesis_models(args)
    if args.dtype != "float32":  # (the tokenizer's encoder and aggregator, as the release ships them)
        stage1.tokenizer.to_precision(dtype=_dtype(args.dtype))
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


def cmd_speak(args) -> None:
    from taste.reconstruct import speak_codes

    device, stage1, centroids, voice = _synthesis_models(args)
    speaker = None
    if args.speaker:
        wav = args.speaker.endswith(".wav")
        speaker = _speaker_vector(args.speaker, _speaker_encoder(args.speaker_model, args.voice, args.model) if wav
                                  else None)  # fmt: skip
    run = {"model": os.path.abspath(args.model), "vocoder": os.path.abspath(args.voice or args.centroids),
           "speaker": args.speaker}  # fmt: skip
    s = speak_codes(stage1, args.codes, args.out_dir, voice=voice, centroids=centroids, speaker=speaker,
                    batch_size=args.batch_size, seed=args.seed, greedy=args.greedy, top_k=args.top_k,
                    max_new_tokens=args.max_units, run=run, progress=not args.quiet)  # fmt: skip
    print(
        f"{s['rows']} wavs, {s['seconds']:.1f} s of speech in {s['elapsed_s']:.1f} s on {device} -> {args.out_dir}"
        + (f"; {s['resumed']} resumed from the journal" if s["resumed"] else "")
        + (f"; {len(s['skipped'])} rows without words skipped: {', '.join(s['skipped'])}" if s["skipped"] else "")
    )


def register(sub) -> None:
    """Adds ``init-tokenizer``, ``train-tokenizer``, ``eval-tokenizer``, ``resynthesize``, ``reconstruct``,
    ``speak``."""
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
    rc.add_argument("--asr", default=None, help="a Whisper checkpoint sharing the tokenizer's encoder (large-v3 or "
                    "distil-large-v3 for the release): transcribe in the tokenizer's encoder pass; a row's text stays "
                    "the reference")  # fmt: skip
    _add_synthesis_options(rc, "wavs/<id>.wav and manifest.jsonl go here", speaker="a row's speaker vector, else "
                           "each utterance's own CAM++ vector (as the official reconstruction), else its mean unit "
                           "features", speaker_model="also scores speaker similarity")  # fmt: skip
    rc.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="the tokenizer's encoder and aggregator (and the ASR)")  # fmt: skip
    rc.add_argument("--json", default=None, help="write the summary here")
    rc.set_defaults(func=cmd_reconstruct)

    sk = sub.add_parser("speak", help="TASTE codes -> unit decoder -> speech for every row of a codes file (`taste "
                        "encode` or `taste generate` output), batched")  # fmt: skip
    sk.add_argument("codes", help="JSONL rows with words and one codes row per word (id, speaker optional)")
    sk.add_argument("--model", required=True, help="the stage-1 model whose tokenizer made the codes (a "
                    "train-tokenizer out_dir, or `taste import-official`'s directory)")  # fmt: skip
    _add_synthesis_options(sk, "<id>.wav go here", speaker="each row's speaker",
                           speaker_model="for a .wav --speaker")  # fmt: skip
    sk.set_defaults(func=cmd_speak)


def _add_synthesis_options(p, out_help: str, *, speaker: str, speaker_model: str) -> None:
    """The options ``reconstruct`` and ``speak`` share: the way back to speech, speakers, output, unit sampling."""
    p.add_argument("--voice", default=None, help="S3 units: the release (or its cosyvoice/voice_generator.pth, or a "
                   "saved VoiceGenerator)")  # fmt: skip
    p.add_argument("--centroids", default=None, help="k-means units: the unit_centroids.safetensors of `taste units`")
    p.add_argument("--speaker", default=None, help="one speaker vector for all rows (a .json/.npy/.safetensors/.pt "
                   f"vector, or a .wav reference); default: {speaker}")  # fmt: skip
    p.add_argument("--speaker-model", default=None, help="the CAM++ ONNX file or a directory holding it (default: "
                   f"looked for under --voice and --model); {speaker_model}")  # fmt: skip
    p.add_argument("-o", "--out-dir", required=True, help=out_help)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="batch k is seeded with SEED + k")
    p.add_argument("--greedy", action="store_true", help="argmax units instead of the decoder's top-k sampling")
    p.add_argument("--top-k", type=int, default=None, help="default: the unit decoder's (25 for the release)")
    p.add_argument("--max-units", type=int, default=None, help="at most this many units per utterance (default: "
                   "the decoder's bound, a multiple of the text's tokens)")  # fmt: skip
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
