"""A real speech corpus without downloads, and discrete unit targets for it.

``synthesize_corpus`` speaks built-in English sentences (50 fixed ones, then random combinations of built-in
subjects, verbs, objects and endings: 45 000 distinct sentences) with espeak-ng (the Debian package), varying the voice,
speaking rate and pitch per utterance, and writes 16 kHz 16-bit mono wavs plus a JSONL manifest with one row
per utterance: ``id, path`` (relative to the manifest), ``text, voice, rate, pitch, duration`` (seconds).

With ``prosody=True`` every word also gets its own speaking rate and pitch and some words are followed by a
pause (espeak-ng SSML: ``<prosody rate pitch>`` per word, ``<break>``), drawn at random: word-level variation
that the transcript and the voice cannot predict, as in real speech (emphasis, hesitation, local tempo). The
draws go into the row as ``prosody``: ``{"rate": [% per word], "pitch": [% per word], "pause_ms": [after each
word]}``. Without it, an utterance is a deterministic function of its text, voice, rate and pitch.

``compute_units`` turns every utterance into 50 Hz discrete units: Whisper-style log-mel frames (80 bins, the
log floor taken per utterance, two 10 ms frames averaged per 20 ms unit), clustered by k-means whose assignment
step is the fused RVQ kernel with one stage. The centroids are saved so that units map back to mel frames.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from taste.audio import HOP_LENGTH, N_FFT, SAMPLE_RATE, mel_filters, resample
from taste.checkpoint import iter_json_objects

UNIT_RATE = 50  # units per second, the rate of CosyVoice's S3 tokens (spec 1.1 item 6)

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore every summer.",
    "A journey of a thousand miles begins with a single step.",
    "Please call Stella and ask her to bring these things from the store.",
    "The weather today is cloudy with a chance of light rain in the evening.",
    "My grandmother kept a small garden full of tomatoes and sweet peppers.",
    "We will meet at the train station at half past seven tomorrow morning.",
    "Learning a new language takes patience, practice and a little courage.",
    "The museum opens its new exhibition on ancient maps next Friday.",
    "He poured a cup of hot coffee and read the newspaper quietly.",
    "Bright stars filled the night sky above the silent mountain lake.",
    "Our team finished the project two days ahead of schedule.",
    "The children laughed as the puppy chased its own tail around the yard.",
    "Remember to turn off the lights when you leave the office.",
    "Fresh bread from the bakery smells wonderful early in the morning.",
    "The river flows slowly through the green valley towards the sea.",
    "Can you tell me the way to the nearest post office?",
    "Scientists discovered a new species of frog in the rainforest.",
    "The old clock on the wall stopped at exactly midnight.",
    "Heavy snow closed the mountain roads for three whole days.",
    "I would like a glass of water and a bowl of vegetable soup.",
    "The pilot announced that we would land in twenty minutes.",
    "Music drifted from an open window on the quiet street.",
    "Every morning he runs five kilometres along the beach.",
    "The library has thousands of books on history and science.",
    "Thank you very much for your kind and thoughtful letter.",
    "A sudden gust of wind blew the papers off the table.",
    "The violinist played a gentle melody for the wedding guests.",
    "Turn left at the second traffic light and park behind the bank.",
    "The committee will announce its decision at the end of the month.",
    "Autumn leaves covered the path in red, orange and gold.",
    "Engineers tested the bridge carefully before it opened to traffic.",
    "She painted the kitchen a pale shade of blue last weekend.",
    "Why does the moon look larger when it is close to the horizon?",
    "The little boat rocked gently in the harbour at sunset.",
    "Our neighbours invited us to dinner on Saturday evening.",
    "He forgot his umbrella and got completely soaked in the storm.",
    "The recipe calls for two eggs, a cup of flour and some butter.",
    "Volunteers planted one hundred trees in the city park.",
    "The teacher explained the experiment step by step.",
    "Do not forget to water the plants while I am away.",
    "A gray cat slept peacefully on the warm windowsill.",
    "The concert was cancelled because the singer had a cold.",
    "They walked along the cliffs and watched the waves crash below.",
    "Please speak a little more slowly so that everyone can follow.",
    "The bakery on the corner sells the best apple pie in town.",
    "Seven golden ducks swam across the pond in a neat line.",
    "The storm knocked out power to half of the town overnight.",
    "She answered every question with a calm and steady voice.",
    "Good ideas often arrive when you least expect them.",
)
# Word lists for more sentences than the fixed ones: subject + verb phrase + object + ending.
_SUBJECTS = (
    "the old farmer",
    "my younger sister",
    "a tired student",
    "the new manager",
    "our friendly neighbour",
    "the little girl",
    "a famous painter",
    "the quiet librarian",
    "his best friend",
    "the taxi driver",
    "a curious child",
    "the night nurse",
    "every good teacher",
    "the brave firefighter",
    "my uncle",
    "the busy chef",
    "a young musician",
    "the city council",
    "her grandfather",
    "the lost traveller",
)
_VERBS = (
    "carefully opened",
    "quickly painted",
    "happily carried",
    "slowly repaired",
    "proudly showed",
    "nervously checked",
    "gently cleaned",
    "suddenly dropped",
    "finally found",
    "quietly watched",
    "loudly described",
    "patiently explained",
    "secretly borrowed",
    "eagerly bought",
    "kindly offered",
)
_OBJECTS = (
    "a wooden box",
    "the broken window",
    "three yellow flowers",
    "an ancient map",
    "the heavy suitcase",
    "a bowl of warm soup",
    "the red bicycle",
    "two silver keys",
    "a long letter",
    "the garden gate",
    "a basket of apples",
    "the kitchen table",
    "an empty bottle",
    "the blue umbrella",
    "a small painting",
)
_ENDINGS = (
    "before breakfast",
    "near the river",
    "after the long meeting",
    "in the afternoon",
    "at the station",
    "during the storm",
    "for the whole family",
    "without a word",
    "on a sunny morning",
    "at midnight",
)


def sentence(i: int, rng: random.Random) -> str:
    """The i-th corpus sentence: the fixed ones first, then random combinations of the word lists above."""
    if i < len(SENTENCES):
        return SENTENCES[i]
    text = " ".join(rng.choice(part) for part in (_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS))
    return text[0].upper() + text[1:] + rng.choice((".", ".", ".", "!", "?"))


# espeak-ng's own English voices (no mbrola needed) and its voice variants.
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan")
VARIANTS = ("", "+m1", "+m3", "+m5", "+f1", "+f2", "+f4", "+klatt")


def espeak_binary() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError(
            "espeak-ng is not installed; the corpus is synthesised with it (Debian/Ubuntu: apt-get install espeak-ng)"
        )
    return path


# WAVE format tags: integer PCM, IEEE float, and the extensible header that carries one of them in its sub-format
_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


def read_wav(path: str) -> tuple[Tensor, int]:
    """A wav file -> ``((T,) float32 in [-1, 1], sample_rate)``; several channels are averaged.

    Integer PCM of 8 (unsigned), 16, 24 or 32 bits and IEEE float of 32 or 64 bits, in the plain or the extensible
    header (what sox, ffmpeg, soundfile and recorders write; Python's ``wave`` module reads 16-bit-style integer PCM
    only). Other encodings (A-law, ADPCM, ...) are refused naming their format tag.
    """
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        raise ValueError(f"{path}: not a RIFF WAVE file")
    if data[:4] == b"RIFX":
        raise ValueError(f"{path}: big-endian (RIFX) wavs are not read")
    fmt, samples, pos = None, None, 12
    while pos + 8 <= len(data) and (fmt is None or samples is None):
        chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = data[pos + 8 : pos + 8 + size]
        if chunk == b"fmt ":
            fmt = body
        elif chunk == b"data":
            samples = body  # (a data chunk cut short, as by an interrupted copy: what is there)
        pos += 8 + size + (size & 1)  # chunks are padded to an even size
    if fmt is None or len(fmt) < 16 or samples is None:
        raise ValueError(f"{path}: no {'fmt ' if fmt is None or len(fmt) < 16 else 'data'} chunk: not a complete wav")
    tag, channels, rate = (int.from_bytes(fmt[a:b], "little") for a, b in ((0, 2), (2, 4), (4, 8)))
    bits = int.from_bytes(fmt[14:16], "little")
    if tag == _EXTENSIBLE and len(fmt) >= 26:
        tag = int.from_bytes(fmt[24:26], "little")  # the sub-format GUID starts with the plain format tag
    width = bits // 8
    if channels < 1 or bits % 8 or (tag, width) not in {(_PCM, 1), (_PCM, 2), (_PCM, 3), (_PCM, 4), (_FLOAT, 4),
                                                         (_FLOAT, 8)}:  # fmt: skip
        raise ValueError(f"{path}: reads integer PCM of 8, 16, 24 or 32 bits and float of 32 or 64 bits; got format "
                         f"tag {tag} with {bits}-bit samples and {channels} channels")  # fmt: skip
    frames = len(samples) // (width * channels)
    raw = np.frombuffer(samples, dtype=np.uint8, count=frames * width * channels)
    if tag == _FLOAT:
        x = raw.view("<f4" if width == 4 else "<f8").astype(np.float32)
    elif width == 1:
        x = (raw.astype(np.float32) - 128.0) / 128.0  # 8-bit wavs are unsigned
    elif width == 3:  # three little-endian bytes, sign-extended through the top byte of an int32
        b = raw.reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8).astype(np.float32) / 2.0**23
    else:
        x = raw.view("<i2" if width == 2 else "<i4").astype(np.float32) / 2.0 ** (bits - 1)
    return torch.from_numpy(x.reshape(frames, channels).mean(axis=1)), rate


def write_wav(path: str, audio: Tensor, sample_rate: int = SAMPLE_RATE) -> None:
    """``(T,)`` float in [-1, 1] -> 16-bit PCM mono wav."""
    pcm = (audio.clamp(-1, 1) * 32767).round().to(torch.int16).numpy()
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.astype("<i2").tobytes())


def word_prosody(num_words: int, rng: random.Random) -> dict:
    """Random word-level prosody for ``prosody=True``: rate 60-160 % and pitch -30..+40 % of the utterance's per
    word, and a 100-400 ms pause after a word (not the last) with probability 0.2."""
    return {
        "rate": [rng.randint(60, 160) for _ in range(num_words)],
        "pitch": [rng.randint(-30, 40) for _ in range(num_words)],
        "pause_ms": [rng.choice((100, 200, 300, 400)) if j + 1 < num_words and rng.random() < 0.2 else 0
                     for j in range(num_words)],
    }  # fmt: skip


def prosody_ssml(text: str, prosody: dict) -> str:
    """The SSML document that speaks ``text``'s whitespace-separated words with ``prosody`` (:func:`word_prosody`)."""
    from xml.sax.saxutils import escape

    words = text.split()
    if any(len(prosody[k]) != len(words) for k in ("rate", "pitch", "pause_ms")):
        raise ValueError(f"prosody must have one rate, pitch and pause_ms per word ({len(words)}) of {text!r}")
    parts = []
    for word, rate, pitch, pause in zip(words, prosody["rate"], prosody["pitch"], prosody["pause_ms"]):
        parts.append(f'<prosody rate="{rate}%" pitch="{pitch:+d}%">{escape(word)}</prosody>')
        if pause:
            parts.append(f'<break time="{pause}ms"/>')
    return "<speak>" + " ".join(parts) + "</speak>"


def _speak(binary: str, text: str, voice: str, rate: int, pitch: int, prosody: dict | None = None):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.wav")
        cmd = [binary, "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", path]
        cmd += ["-m", "--", prosody_ssml(text, prosody)] if prosody is not None else ["--", text]
        subprocess.run(cmd, check=True, capture_output=True)
        return read_wav(path)


def synthesize_corpus(out_dir: str, num: int, *, seed: int = 0, workers: int = 4, prosody: bool = False) -> str:
    """Writes ``num`` utterances and ``manifest.jsonl`` into ``out_dir``; returns the manifest path. ``prosody``:
    random word-level rate, pitch and pauses (see the module docstring)."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    binary = espeak_binary()
    rng = random.Random(seed)
    rows = []
    for i in range(num):
        rows.append(
            {
                "id": f"utt{i:06d}",
                "text": sentence(i, rng),
                "voice": rng.choice(VOICES) + rng.choice(VARIANTS),
                "rate": rng.randint(130, 210),  # words per minute
                "pitch": rng.randint(25, 75),  # espeak's 0-99 scale
            }
        )
        if prosody:
            rows[-1]["prosody"] = word_prosody(len(rows[-1]["text"].split()), rng)
    os.makedirs(os.path.join(out_dir, "wavs"), exist_ok=True)

    def make(row: dict) -> dict:
        audio, rate = _speak(binary, row["text"], row["voice"], row["rate"], row["pitch"], row.get("prosody"))
        audio = resample(audio, rate, SAMPLE_RATE)
        rel = os.path.join("wavs", f"{row['id']}.wav")
        write_wav(os.path.join(out_dir, rel), audio)
        keys = ("text", "voice", "rate", "pitch", "prosody")
        return {"id": row["id"], "path": rel, **{k: row[k] for k in keys if k in row},
                "duration": round(audio.numel() / SAMPLE_RATE, 4)}  # fmt: skip

    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = list(pool.map(make, rows))
    manifest = os.path.join(out_dir, "manifest.jsonl")
    write_manifest(manifest, done)
    return manifest


def read_manifest(path: str, *, need_text: bool = True) -> list[dict]:
    """Rows of a JSONL manifest, with ``path`` made absolute (relative paths are relative to the manifest) as
    ``audio_path``; each row needs ``id``, ``path`` and, with ``need_text``, ``text``."""
    rows = []
    base = os.path.dirname(os.path.abspath(path))
    for where, row in iter_json_objects(path, "manifest row"):
        for key in ("id", "path", "text") if need_text else ("id", "path"):
            if key not in row:
                raise ValueError(f"{where}: manifest row has no {key!r} field")
        row["audio_path"] = os.path.join(base, row["path"])
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def name_manifest_rows(message: str, ids: list[str], manifest: str) -> str:
    """An error about ``texts[k]`` or ``waveforms[k]`` of a batch made of the manifest rows ``ids`` (in batch order,
    which is not the manifest's), about the manifest row instead."""
    return re.sub(r"\b(texts|waveforms)\[(\d+)\]", lambda m: f"row {ids[int(m[2])]!r} of {manifest} ({m[1]})", message)


def write_manifest(path: str, rows: list[dict]) -> None:
    """Writes JSONL rows; a row read by :func:`read_manifest` gets its ``path`` relative to the new file."""
    with open(path, "w") as f:
        for row in manifest_rows_for(path, rows):
            f.write(json.dumps(row) + "\n")


def manifest_rows_for(path: str, rows: Iterable[dict]) -> Iterator[dict]:
    """The rows as a manifest at ``path`` holds them: a row read by :func:`read_manifest` without its
    ``audio_path``, and its ``path`` relative to ``path``'s directory."""
    base = os.path.dirname(os.path.abspath(path))
    for row in rows:
        out = {k: v for k, v in row.items() if k != "audio_path"}
        if "audio_path" in row:
            out["path"] = os.path.relpath(row["audio_path"], base)
        yield out


def unit_features(audio: Tensor, n_mels: int = 80) -> Tensor:
    """``(T,)`` 16 kHz audio -> ``(T // 320, n_mels)``: Whisper-style log-mel at 50 Hz (pairs of frames averaged)."""
    window = torch.hann_window(N_FFT, device=audio.device)
    spec = torch.stft(audio.float(), N_FFT, HOP_LENGTH, window=window, return_complex=True)[..., :-1]
    mel = mel_filters(n_mels, audio.device) @ spec.abs().square()  # (n_mels, F)
    log_spec = mel.clamp(min=1e-10).log10()
    log_spec = (torch.maximum(log_spec, log_spec.max() - 8.0) + 4.0) / 4.0
    pairs = log_spec.shape[1] // 2
    return log_spec[:, : 2 * pairs].reshape(n_mels, pairs, 2).mean(-1).T.contiguous()  # (pairs, n_mels)


def iter_features(rows: list[dict], n_mels: int) -> Iterator[Tensor]:
    for row in rows:
        audio, rate = read_wav(row["audio_path"])
        yield unit_features(resample(audio, rate, SAMPLE_RATE), n_mels)


def compute_units(
    manifest: str, k: int = 256, *, iters: int = 30, n_mels: int = 80, max_frames: int = 200_000, seed: int = 0,
    out: str | None = None,
) -> str:  # fmt: skip
    """Fits k-means on (up to ``max_frames``) 50 Hz log-mel frames of the manifest, assigns every frame, and
    writes ``out`` (default ``<manifest>.units.jsonl``: the manifest rows plus ``units``) and the centroids to
    ``unit_centroids.safetensors`` beside it. Returns the new manifest's path."""
    from safetensors.torch import save_file

    from taste.ops import rvq_encode
    from taste.rvq import kmeans

    rows = read_manifest(manifest)
    feats = list(iter_features(rows, n_mels))
    frames = torch.cat(feats)  # (F_total, n_mels)
    if frames.shape[0] < k:
        raise ValueError(f"the manifest has {frames.shape[0]} frames, fewer than k={k} units")
    g = torch.Generator().manual_seed(seed)
    sample = frames[torch.randperm(frames.shape[0], generator=g)[:max_frames]]
    centroids, _ = kmeans(sample, k, iters, generator=g)
    for row, f in zip(rows, feats):
        row["units"] = rvq_encode(f, centroids[None])[0][:, 0].tolist()
        row["unit_rate"] = UNIT_RATE
    out = out or os.path.splitext(manifest)[0] + ".units.jsonl"
    write_manifest(out, rows)
    meta = {"n_mels": str(n_mels), "unit_rate": str(UNIT_RATE), "k": str(k)}
    path = os.path.join(os.path.dirname(os.path.abspath(out)), "unit_centroids.safetensors")
    save_file({"centroids": centroids.contiguous()}, path, metadata=meta)
    return out
