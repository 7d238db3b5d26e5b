"""Speech through TASTE and back, batched: the official ``inference_reconstruction`` (the speech autoencoder of the
paper's Table 1) for many utterances at once.

waveforms + transcripts (or a Whisper ASR reading the tokenizer's own encoder pass) -> TASTE word codes -> the unit
decoder (text tokens + code embeddings + speaker vector) -> units -> speech: the voice generator (flow matching +
HiFT, 22.05 kHz) for the release's S3 units, or Griffin-Lim over the centroids of ``taste units`` for k-means units
(16 kHz). The official code runs one utterance at a time, each through the ASR pipeline and then the same encoder
again; here every stage takes the whole batch.

:func:`speak` is the second half (words + TASTE rows -> units -> speech), which speech continuation shares.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

STAGES = ("vq", "no_vq", "text")


@dataclass
class Reconstruction:
    """texts: the transcripts the codes were made with (given, or the ASR's); codes: B ``(W_i, Q)`` int64 on the
    CPU (all -1 for a ``no_vq`` or ``text`` model); units: B 1-D int64 unit tensors on the CPU; waves: B 1-D float
    waveforms at ``sample_rate``."""

    texts: list[str]
    codes: list[Tensor]
    units: list[Tensor]
    waves: list[Tensor]
    sample_rate: int


def check_vocoder(num_units: int, voice=None, centroids: Tensor | None = None) -> None:
    """Exactly one way back to speech, and one that reads ``num_units`` units (the unit decoder's)."""
    from taste.evaluate import check_centroids

    if (centroids is None) == (voice is None):
        raise ValueError("give either centroids (k-means units, Griffin-Lim) or voice (S3 units, a VoiceGenerator)")
    if centroids is not None:
        check_centroids(centroids, num_units)
    elif voice.config.num_units != num_units:
        raise ValueError(f"the voice generator reads {voice.config.num_units} units, the unit decoder writes "
                         f"{num_units}")  # fmt: skip


def default_speakers(decoder, waveforms: Sequence[Tensor], sample_rate: int | Sequence[int]) -> Tensor:
    """``(B, n_mels)``: each utterance's mean 50 Hz log-mel frame, the speaker input that models trained on ``taste
    units`` manifests without speaker vectors take; refused (naming what to give) by a decoder of other vectors."""
    from taste.audio import resample
    from taste.corpus import unit_features

    rates = [sample_rate] * len(waveforms) if isinstance(sample_rate, int) else list(sample_rate)
    rows = [unit_features(resample(w.float(), r, 16000)).mean(0) for w, r in zip(waveforms, rates)]
    if rows and rows[0].shape != (decoder.config.spk_dim,):
        raise ValueError(f"this unit decoder takes ({decoder.config.spk_dim},) speaker vectors (the official one: "
                         f"CAM++), not the audio's {rows[0].shape[0]} mean unit features: give speaker")  # fmt: skip
    return torch.stack(rows) if rows else torch.zeros(0, decoder.config.spk_dim)


@torch.no_grad()
def speak(stage1, texts: Sequence[str], taste: Tensor | None, speaker: Tensor, *, voice=None,
          centroids: Tensor | None = None, seed: int = 0, greedy: bool = False, top_k: int | None = None,
          max_new_tokens: int | None = None) -> tuple[list[Tensor], list[Tensor], int]:  # fmt: skip
    """Words and their TASTE rows -> units -> speech, for a batch.

    Args:
        stage1: a :class:`taste.train.Stage1Model` (its tokenizer tokenises ``texts`` for the unit decoder).
        texts: B transcripts; ``taste`` ``(W_total, taste_dim)`` float, one row per word of them in order (None: a
            ``text`` stage-1 model, which reads no TASTE rows).
        speaker: ``(B, spk_dim)`` float speaker vectors of the unit decoder (and the voice generator, when its
            vectors have that size; else it gets zeros, with a warning).
        voice / centroids: the way back to speech, one of them (:func:`check_vocoder`).
        seed: seeds the unit sampling (a generator on the decoder's device) and the voice generator's noise (a CPU
            generator, as :meth:`taste.VoiceGenerator.generate` draws it).
        greedy / top_k / max_new_tokens: :meth:`taste.UnitDecoder.generate`'s (``max_new_tokens`` caps the units
            of an utterance below the decoder's own bound, a multiple of its text length).

    Returns:
        ``(units, waves, sample_rate)``: B 1-D units on the CPU, B 1-D waveforms.
    """
    from taste.evaluate import units_to_wave

    decoder = stage1.decoder.eval()
    check_vocoder(decoder.config.num_units, voice, centroids)
    if speaker.shape != (len(texts), decoder.config.spk_dim):
        raise ValueError(f"speaker must be ({len(texts)}, {decoder.config.spk_dim}) (a vector per utterance of this "
                         f"unit decoder's size), got {tuple(speaker.shape)}")  # fmt: skip
    weight = decoder.speech_embedding.weight
    a = stage1.tokenizer.text_tokenizer(list(texts)).asr
    dev = weight.device
    units = decoder.generate(
        a.tokens.to(dev), a.cu_seqlens.to(dev), a.max_seqlen, taste=None if taste is None else taste.to(weight),
        word_offsets=a.word_offsets.to(dev), speaker=speaker.to(weight), greedy=greedy, top_k=top_k,
        max_new_tokens=max_new_tokens, generator=torch.Generator(device=dev).manual_seed(seed),
    )  # fmt: skip
    if voice is None:
        return units, [units_to_wave(u, centroids) for u in units], 16000
    spk = speaker if speaker.shape[1] == voice.config.spk_dim else None
    if spk is None:
        warnings.warn(f"the voice generator takes ({voice.config.spk_dim},) speaker vectors, the unit decoder "
                      f"({decoder.config.spk_dim},): the voice generator gets zeros", stacklevel=2)  # fmt: skip
    empty = [i for i, u in enumerate(units) if not u.numel()]
    if empty:  # (a decoder stopped at once: the voice generator has nothing to stretch)
        raise RuntimeError(f"the unit decoder made no units for utterance(s) {empty}")
    waves = voice.generate(units, spk, generator=torch.Generator().manual_seed(seed))
    return units, [w.float().cpu() for w in waves], voice.sample_rate


@torch.no_grad()
def reconstruct(
    stage1, waveforms: Sequence[Tensor], texts: Sequence[str] | None = None, *,
    sample_rate: int | Sequence[int] = 16000, voice=None, centroids: Tensor | None = None,
    speaker: Tensor | None = None, asr=None, stage: str = "vq", seed: int = 0, greedy: bool = False,
    top_k: int | None = None, max_new_tokens: int | None = None, check_encoder: bool = True,
) -> Reconstruction:  # fmt: skip
    """A batch of utterances through TASTE and back to speech (module docstring).

    Args:
        stage1: a :class:`taste.train.Stage1Model` (``taste.load_official`` gives the released one's parts; ``taste
            import-official`` writes a directory that ``Stage1Model.from_pretrained`` reads).
        waveforms: B 1-D float waveforms at ``sample_rate`` (an int, or one per waveform), each within the encoder's
            window.
        texts: their B transcripts; None to have ``asr`` (a :class:`taste.asr.WhisperTranscriber` of the tokenizer's
            Whisper encoder, as the official pipeline) transcribe them from the tokenizer's own encoder pass
            (``check_encoder``: see :meth:`taste.TasteTokenizer.transcribe_and_encode`).
        voice / centroids: a :class:`taste.VoiceGenerator` for S3 units, or ``(num_units, n_mels)`` centroids of
            ``taste units`` for k-means units (Griffin-Lim).
        speaker: ``(B, spk_dim)`` or ``(spk_dim,)`` speaker vectors (the official models take the utterances' own
            CAM++ vectors: :meth:`taste.SpeakerEncoder.embed`, normalised); None: each utterance's mean unit
            features (models trained without speaker vectors).
        stage: what the decoder was trained to read (``taste train-tokenizer``'s stage): ``vq`` the codes'
            embeddings, ``no_vq`` the pooled embeddings before the quantizer, ``text`` no TASTE rows.
        seed / greedy / top_k / max_new_tokens: unit sampling (:func:`speak`; the decoder's top-k by default) and
            the voice generator's noise. A seeded batch repeats; its draws interleave its utterances, so it is not
            its utterances' lone runs.
    """
    from taste.tokenizer import _codes_per_utterance

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    tok = stage1.tokenizer
    check_vocoder(stage1.decoder.config.num_units, voice, centroids)
    if (texts is None) == (asr is None):
        raise ValueError("give texts (the transcripts) or asr (a WhisperTranscriber to transcribe them), one of them")
    if asr is not None and stage != "vq":
        raise ValueError(f"asr transcribes through a vq model's encoder pass and codes; a {stage!r} model needs texts")
    batch = len(waveforms)
    if speaker is not None:
        speaker = speaker.expand(batch, -1) if speaker.dim() == 1 else speaker
    if batch == 0:
        return Reconstruction([], [], [], [], voice.sample_rate if voice is not None else 16000)
    if speaker is None:
        speaker = default_speakers(stage1.decoder, waveforms, sample_rate)
    with tok._evaluating():
        if texts is None:  # one encoder pass for the transcripts and the codes
            texts, codes = tok.transcribe_and_encode(waveforms, asr, sample_rate, check_encoder=check_encoder)
        else:
            texts = list(texts)
            mel, text = tok.prepare(waveforms, texts, sample_rate)
            out = tok.tokenize(mel, text, quantize=stage == "vq")
            codes = _codes_per_utterance(out, text)
            taste = None if stage == "text" else out.word_embeddings
        if stage == "vq":  # the decoder reads what the codes say (as for codes TASLM generates)
            taste = tok.embeddings_from_codes(torch.cat(codes))
    units, waves, rate = speak(stage1, texts, taste, speaker, voice=voice, centroids=centroids, seed=seed,
                               greedy=greedy, top_k=top_k, max_new_tokens=max_new_tokens)  # fmt: skip
    return Reconstruction(list(texts), codes, units, waves, rate)


def _row_speakers(rows: list[dict], manifest: str, size: int) -> Tensor | None:
    """The rows' own ``speaker`` vectors ``(B, size)``, or None where no row has one; refuses a batch in which some
    rows have one and others not (they would get different kinds of vector)."""
    from taste.train import _speaker_of

    have = ["speaker" in row for row in rows]
    if not any(have):
        return None
    if not all(have):
        missing = rows[have.index(False)]["id"]
        raise ValueError(f"row {missing!r} of {manifest} has no 'speaker' vector but other rows have: give every row "
                         "one, or none")  # fmt: skip
    return torch.stack([_speaker_of(row, manifest, size) for row in rows])


def reconstruct_manifest(
    stage1, manifest: str, out_dir: str, *, voice=None, centroids: Tensor | None = None, asr=None,
    speaker: Tensor | None = None, speaker_encoder=None, stage: str = "vq", batch_size: int = 8, seed: int = 0,
    greedy: bool = False, top_k: int | None = None, max_new_tokens: int | None = None, run: dict | None = None,
    progress: bool = False,
) -> dict:  # fmt: skip
    """:func:`reconstruct` over a JSONL manifest (``taste reconstruct``): ``out_dir/wavs/<id>.wav`` and
    ``out_dir/manifest.jsonl``, whose rows (``id``, ``path``, ``text``, ``source``, ``codes``, ``units``, durations,
    ``speaker_similarity``) ``taste transcribe --whisper`` scores for WER as they are.

    Speaker vectors, first found: ``speaker`` (one for all), the rows' own ``speaker`` vectors, the utterances' own
    CAM++ vectors from ``speaker_encoder`` (a :class:`taste.SpeakerEncoder`; the official reconstruction), each
    utterance's mean unit features. With ``speaker_encoder``, each row also gets the cosine similarity of the CAM++
    embeddings of its source and its reconstruction.

    Batches of ``batch_size`` utterances alike in length, batch ``k`` seeded with ``seed + k``; each batch is kept in
    ``out_dir/manifest.jsonl.partial`` as it finishes, and a rerun with the same settings (``run``: what else the
    caller wants a resumed run to match, e.g. model paths) carries on from there with the same results as an
    uninterrupted run. Returns a summary (durations, the mean speaker similarity, timing).
    """
    import json
    import os
    import time

    import torch.nn.functional as F
    from tqdm import tqdm

    from taste._checks import check_positive_int
    from taste.checkpoint import open_journal, write_jsonl_atomically
    from taste.corpus import name_manifest_rows, read_manifest, read_wav, write_wav

    check_positive_int(batch_size, "batch_size")
    rows = read_manifest(manifest, need_text=asr is None)
    for row in rows:
        name = str(row["id"])
        if not name or os.sep in name or name in (".", "..") or (os.altsep and os.altsep in name):
            raise ValueError(f"row {row['id']!r} of {manifest}: its id cannot name a file (<id>.wav)")
    if len({str(row["id"]) for row in rows}) != len(rows):
        raise ValueError(f"{manifest}: two rows have the same id (each becomes <id>.wav)")
    os.makedirs(os.path.join(out_dir, "wavs"), exist_ok=True)
    journal = os.path.join(out_dir, "manifest.jsonl.partial")
    codebooks = stage1.tokenizer.quantizer.codebook_digest()  # (a model retrained at the same path: not resumed)
    header = {"taste_reconstruct": 1, "manifest": os.path.abspath(manifest), "rows": len(rows), "stage": stage,
              "codebooks": codebooks,
              "batch_size": batch_size, "seed": seed, "greedy": greedy, "top_k": top_k,
              "max_new_tokens": max_new_tokens, "asr": asr is not None, "similarity": speaker_encoder is not None,
              **(run or {})}  # fmt: skip
    done = open_journal(journal, header, [row["id"] for row in rows], manifest, "reconstruction")
    resumed = len(done)
    order = sorted(range(len(rows)), key=lambda i: rows[i].get("duration", 0.0))  # (alike lengths per batch)
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    t, seconds = time.perf_counter(), 0.0
    with open(journal, "a") as log, tqdm(total=len(rows), initial=len(done), unit="utt", disable=not progress) as bar:
        for k, batch in enumerate(batches):
            if all(i in done for i in batch):
                continue
            audio = [read_wav(rows[i]["audio_path"]) for i in batch]
            waves, rates = [a for a, _ in audio], [r for _, r in audio]
            seconds += sum(a.numel() / r for a, r in audio)
            part = [rows[i] for i in batch]
            source_emb = None if speaker_encoder is None else F.normalize(speaker_encoder.embed(waves, rates), dim=1)
            spk = speaker
            if spk is None:
                spk = _row_speakers(part, manifest, stage1.decoder.config.spk_dim)
            if spk is None and source_emb is not None and source_emb.shape[1] == stage1.decoder.config.spk_dim:
                spk = source_emb  # (the official reconstruction: each utterance's own CAM++ vector)
            try:
                out = reconstruct(stage1, waves, None if asr is not None else [r["text"] for r in part],
                                  sample_rate=rates, voice=voice, centroids=centroids, speaker=spk, asr=asr,
                                  stage=stage, seed=seed + k, greedy=greedy, top_k=top_k,
                                  max_new_tokens=max_new_tokens)  # fmt: skip
            except (TypeError, ValueError) as e:  # (bad values of the manifest's rows, whichever kind)
                raise ValueError(name_manifest_rows(str(e), [r["id"] for r in part], manifest)) from e
            similarity = [None] * len(batch)
            if speaker_encoder is not None:
                made = F.normalize(speaker_encoder.embed(out.waves, out.sample_rate), dim=1)
                similarity = (made * source_emb).sum(1).tolist()
            for i, row, source, rate, text, codes, units, wave, sim in zip(
                batch, part, waves, rates, out.texts, out.codes, out.units, out.waves, similarity
            ):
                path = os.path.join(out_dir, "wavs", f"{row['id']}.wav")
                write_wav(path + ".tmp", wave, out.sample_rate)
                os.replace(path + ".tmp", path)
                record = {"index": i, "id": row["id"], "text": text.strip(), "codes": codes.tolist(),
                          "units": units.tolist(), "sample_rate": out.sample_rate,
                          "duration": round(wave.numel() / out.sample_rate, 4),
                          "source_duration": round(source.numel() / rate, 4)}  # fmt: skip
                if sim is not None:
                    record["speaker_similarity"] = round(sim, 6)
                done[i] = record
                log.write(json.dumps(record) + "\n")
            log.flush()  # a batch made is a batch kept, whatever stops the run later
            bar.update(len(batch))
    elapsed = time.perf_counter() - t

    def output_row(i: int, row: dict) -> dict:
        r = done[i]
        out = {"id": row["id"], "path": os.path.join("wavs", f"{row['id']}.wav"),
               "text": row.get("text", r["text"]), "source": os.path.relpath(row["audio_path"], out_dir)}  # fmt: skip
        if asr is not None:
            out["encoded_text"] = r["text"]  # (the ASR's: what the codes were made with)
        out["words"] = r["text"].split()  # (with codes and codebooks: a codes file, as `taste encode` writes)
        return {**out, **{key: r[key] for key in r if key not in ("index", "id", "text")}, "codebooks": codebooks}

    out_rows = [output_row(i, row) for i, row in enumerate(rows)]
    write_jsonl_atomically(os.path.join(out_dir, "manifest.jsonl"), out_rows)
    os.remove(journal)
    made = torch.tensor([r["duration"] for r in out_rows], dtype=torch.float64)
    source = torch.tensor([r["source_duration"] for r in out_rows], dtype=torch.float64)
    summary = {"utterances": len(rows), "resumed": resumed, "source_seconds": float(source.sum()),
               "seconds": float(made.sum()), "duration_ratio": float((made / source).mean()),
               "duration_abs_rel_error": float(((made - source).abs() / source).mean()), "elapsed_s": elapsed,
               "real_time_factor": elapsed / seconds if seconds else None,
               "sample_rate": out_rows[0]["sample_rate"]}  # fmt: skip
    if speaker_encoder is not None:
        summary["speaker_similarity"] = sum(r["speaker_similarity"] for r in out_rows) / len(out_rows)
    return summary


def speak_codes(
    stage1, codes_path: str, out_dir: str, *, voice=None, centroids: Tensor | None = None,
    speaker: Tensor | None = None, batch_size: int = 8, seed: int = 0, greedy: bool = False,
    top_k: int | None = None, max_new_tokens: int | None = None, run: dict | None = None, progress: bool = False,
) -> dict:  # fmt: skip
    """TASTE codes to speech (``taste speak``): every row of a codes file (``taste encode``'s, or ``taste
    generate``'s: ``words`` and one ``codes`` row per word) through the unit decoder and back to a waveform,
    ``out_dir/<id>.wav`` (the row's ``id``, else its line number), batches of ``batch_size`` rows in file order,
    batch ``k`` seeded with ``seed + k``. Speaker vectors: ``speaker`` for all, else each row's ``speaker``. Rows
    whose ``codebooks`` digest is not the tokenizer's are refused; rows without words (a generation that ended at
    once) are skipped and named in the summary. Finished batches are kept in ``out_dir/speak.jsonl.partial``; a
    rerun with the same settings (``run``: what else it must match) carries on from there with the same results.
    Returns a summary (rows, rows resumed, skipped ids, seconds, timing)."""
    import json
    import os
    import time

    from tqdm import tqdm

    from taste._checks import check_positive_int
    from taste.checkpoint import iter_json_objects, open_journal
    from taste.corpus import write_wav
    from taste.train import _speaker_of
    from taste.train_lm import code_row

    check_positive_int(batch_size, "batch_size")
    tok, spk_dim = stage1.tokenizer, stage1.decoder.config.spk_dim
    check_vocoder(stage1.decoder.config.num_units, voice, centroids)
    q = tok.quantizer
    rows, skipped = [], []
    for n, (where, row) in enumerate(iter_json_objects(codes_path, "codes row")):
        name = str(row.get("id", n))
        if not name or os.sep in name or name in (".", "..") or (os.altsep and os.altsep in name):
            raise ValueError(f"{where}: the id {name!r} cannot name a file (<id>.wav)")
        if row.get("words") == [] and not row.get("codes"):  # (a generation that ended at once: nothing to say)
            skipped.append(name)
            continue
        words, codes = code_row(where, row, q.num_quantizers, q.codebook_size, q.codebook_digest())
        if speaker is not None:
            vector = speaker
        elif "speaker" in row:
            vector = _speaker_of({**row, "id": name}, codes_path, spk_dim)
        else:
            raise ValueError(f"{where}: no speaker vector: give one for all rows (speaker, --speaker) or a 'speaker' "
                             f"of {spk_dim} numbers in each row")  # fmt: skip
        rows.append((name, " ".join(words), codes, vector))
    if not rows:
        raise ValueError(f"{codes_path} holds no rows with words")
    names = [name for name, _, _, _ in rows] + skipped
    if len(set(names)) != len(names):
        raise ValueError(f"{codes_path}: two rows have the same id (each becomes <id>.wav)")
    os.makedirs(out_dir, exist_ok=True)
    journal = os.path.join(out_dir, "speak.jsonl.partial")
    header = {"taste_speak": 1, "codes": os.path.abspath(codes_path), "rows": len(rows), "codebooks":
              q.codebook_digest(), "batch_size": batch_size, "seed": seed, "greedy": greedy, "top_k": top_k,
              "max_new_tokens": max_new_tokens, **(run or {})}  # fmt: skip
    done = open_journal(journal, header, names[: len(rows)], codes_path, "speak")
    resumed = len(done)
    t = time.perf_counter()
    with open(journal, "a") as log, tqdm(total=len(rows), initial=resumed, unit="utt", disable=not progress) as bar:
        for k in range(0, len(rows), batch_size):
            if all(i in done for i in range(k, min(k + batch_size, len(rows)))):
                continue
            part = rows[k : k + batch_size]
            taste = tok.embeddings_from_codes(torch.cat([codes for _, _, codes, _ in part]))
            spk = torch.stack([v.float() for _, _, _, v in part])
            _, waves, rate = speak(stage1, [text for _, text, _, _ in part], taste, spk, voice=voice,
                                   centroids=centroids, seed=seed + k // batch_size, greedy=greedy, top_k=top_k,
                                   max_new_tokens=max_new_tokens)  # fmt: skip
            for i, (name, _, _, _), wave in zip(range(k, k + len(part)), part, waves):
                path = os.path.join(out_dir, f"{name}.wav")
                write_wav(path + ".tmp", wave, rate)
                os.replace(path + ".tmp", path)
                done[i] = {"index": i, "id": name, "seconds": round(wave.numel() / rate, 4), "sample_rate": rate}
                log.write(json.dumps(done[i]) + "\n")
            log.flush()  # a batch made is a batch kept, whatever stops the run later
            bar.update(len(part))
    os.remove(journal)
    return {"rows": len(rows), "resumed": resumed, "skipped": skipped,
            "seconds": sum(r["seconds"] for r in done.values()), "elapsed_s": time.perf_counter() - t,
            "sample_rate": done[0]["sample_rate"]}  # fmt: skip
