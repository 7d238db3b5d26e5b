"""TASLM prompts from text or speech, and speech continuation end to end (spec 2.7, "back to speech"):
transcript -> TASTE codes -> TASLM -> new words and codes -> unit decoder -> units -> waveform."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from taste.generate import GenerationConfig, GenerationOutput
from taste.spoken_lm import TasteSpokenLM
from taste.text import WordTokenizer


def prompt_batch(words: Sequence[Sequence[str]], llm_tokenizer: str = "llama3") -> tuple[Tensor, Tensor, Tensor]:
    """Packed Llama prompt ``(tokens (N,) int64, cu_seqlens (B+1,) int32, word_ids (N,) int32)`` of word lists
    (every word tokenised alone with a leading space, as in training)."""
    packed = WordTokenizer(llm_tokenizer).pack(words)
    return packed.tokens, packed.cu_seqlens, packed.word_ids


def generated_words(lm: TasteSpokenLM, out: GenerationOutput) -> list[tuple[list[str], Tensor]]:
    """Per sequence: the generated words and their codes ``(W, Q)`` (one row per word)."""
    tok = WordTokenizer(lm.config.llm_tokenizer)
    result = []
    for b in range(out.tokens.shape[0]):
        words = out.words(b, tok.decode)
        result.append((words, out.codes[b, : int(out.num_words[b])].cpu()))
    return result


@torch.no_grad()
def continue_speech(
    lm: TasteSpokenLM,
    stage1,
    audio: Tensor,
    text: str | None,
    centroids: Tensor | None = None,
    *,
    sample_rate: int = 16000,
    config: GenerationConfig | None = None,
    seed: int = 0,
    only_new: bool = False,
    voice=None,
    speaker: Tensor | None = None,
    asr=None,
) -> dict:
    """Continues one spoken prompt.

    Args:
        lm: a trained :class:`taste.TasteSpokenLM` (its RVQ = the tokenizer's).
        stage1: a :class:`taste.train.Stage1Model` (TASTE tokenizer + unit decoder) trained with stage 1-3.
        audio: ``(T,)`` float waveform of the prompt; ``text`` its transcript, or None to have ``asr`` (a
            :class:`taste.asr.WhisperTranscriber` of the tokenizer's Whisper encoder, e.g. large-v3's decoder, as
            the official demo) transcribe it from the tokenizer's own encoder pass.
        centroids: ``(num_units, n_mels)`` unit centroids of ``taste units`` (the Griffin-Lim vocoder's mel frames,
            for k-means units), or
        voice: a :class:`taste.VoiceGenerator` (for S3 units: the released unit decoder's; ``taste.load_official``
            and ``taste import-official`` give such a stage-1 model).
        speaker: ``(spk_dim,)`` speaker vector (the official models take CAM++ vectors of 192) for the unit decoder
            and the voice generator; None: the prompt's mean unit features (what ``taste units`` models train with).
        only_new: synthesise only the generated words (default: prompt + continuation, as the official demo).

    Returns:
        dict with ``prompt_words``, ``new_words``, ``prompt_codes`` (W_p, Q), ``new_codes`` (W_n, Q), ``units``,
        ``wave`` (float waveform) and its ``sample_rate`` (16 kHz with centroids, the voice generator's with voice).
    """
    from taste.reconstruct import check_vocoder, default_speakers, speak

    dc = stage1.decoder.config
    check_vocoder(dc.num_units, voice, centroids)
    if speaker is not None and speaker.shape != (dc.spk_dim,):
        raise ValueError(f"speaker must be a ({dc.spk_dim},) vector for this unit decoder, got {tuple(speaker.shape)}")
    tok = stage1.tokenizer.eval()
    if (text is None) == (asr is None):
        raise ValueError("give text (the prompt's transcript) or asr (a WhisperTranscriber to transcribe it), "
                         "one of them")  # fmt: skip
    if text is not None and not text.split():
        raise ValueError("text must hold the prompt's transcript (at least one word)")
    ours, theirs = tok.quantizer.codebook_digest(), lm.vq.codebook_digest()
    if ours != theirs:  # (codes of one decoded by the other: no error, only wrong speech)
        raise ValueError(f"the tokenizer's codebooks ({ours}) are not the spoken LM's ({theirs}): give the stage-1 "
                         "model whose tokenizer the LM was built on")  # fmt: skip
    if text is None:  # one encoder pass for the transcript and the codes
        (text,), (prompt_codes,) = tok.transcribe_and_encode([audio], asr, sample_rate)
    else:
        prompt_codes = tok.encode([audio], [text], sample_rate)[0]  # (W_p, Q)
    words = text.split()
    tokens, cu, word_ids = prompt_batch([words], lm.config.llm_tokenizer)
    generator = torch.Generator(device=lm.pad_text_unit_embed.device).manual_seed(seed)
    out = lm.generate(tokens, cu, word_ids, prompt_codes, config=config or GenerationConfig(), generator=generator)
    new_words, new_codes = generated_words(lm, out)[0]
    all_words = new_words if only_new else words + new_words
    all_codes = new_codes if only_new else torch.cat([prompt_codes, new_codes])
    if not all_words:
        raise RuntimeError("the spoken LM generated no words")
    taste = tok.embeddings_from_codes(all_codes.to(tok.quantizer.embed.device))
    speaker = default_speakers(stage1.decoder, [audio], sample_rate) if speaker is None else speaker[None]
    (units,), (wave,), rate = speak(stage1, [" ".join(all_words)], taste, speaker, voice=voice, centroids=centroids,
                                    seed=seed)  # fmt: skip
    return {"prompt_words": words, "new_words": new_words, "prompt_codes": prompt_codes, "new_codes": new_codes,
            "units": units, "wave": wave, "sample_rate": rate}  # fmt: skip
