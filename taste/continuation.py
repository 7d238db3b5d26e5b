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
    text: str,
    centroids: Tensor,
    *,
    sample_rate: int = 16000,
    config: GenerationConfig | None = None,
    seed: int = 0,
    only_new: bool = False,
) -> dict:
    """Continues one spoken prompt.

    Args:
        lm: a trained :class:`taste.TasteSpokenLM` (its RVQ = the tokenizer's).
        stage1: a :class:`taste.train.Stage1Model` (TASTE tokenizer + unit decoder) trained with stage 1-3.
        audio: ``(T,)`` float waveform of the prompt; ``text`` its transcript.
        centroids: ``(num_units, n_mels)`` unit centroids of ``taste units`` (the Griffin-Lim vocoder's mel frames).
        only_new: synthesise only the generated words (default: prompt + continuation, as the official demo).

    Returns:
        dict with ``prompt_words``, ``new_words``, ``prompt_codes`` (W_p, Q), ``new_codes`` (W_n, Q), ``units`` and
        ``wave`` (16 kHz float waveform).
    """
    from taste.audio import resample
    from taste.corpus import unit_features
    from taste.evaluate import check_centroids, units_to_wave

    check_centroids(centroids, stage1.decoder.config.num_units)
    tok = stage1.tokenizer.eval()
    words = text.split()
    if not words:
        raise ValueError("text must hold the prompt's transcript (at least one word)")
    ours, theirs = tok.quantizer.codebook_digest(), lm.vq.codebook_digest()
    if ours != theirs:  # (codes of one decoded by the other: no error, only wrong speech)
        raise ValueError(f"the tokenizer's codebooks ({ours}) are not the spoken LM's ({theirs}): give the stage-1 "
                         "model whose tokenizer the LM was built on")  # fmt: skip
    prompt_codes = tok.encode([audio], [text], sample_rate)[0]  # (W_p, Q)
    tokens, cu, word_ids = prompt_batch([words], lm.config.llm_tokenizer)
    generator = torch.Generator(device=lm.pad_text_unit_embed.device).manual_seed(seed)
    out = lm.generate(tokens, cu, word_ids, prompt_codes, config=config or GenerationConfig(), generator=generator)
    new_words, new_codes = generated_words(lm, out)[0]
    all_words = new_words if only_new else words + new_words
    all_codes = new_codes if only_new else torch.cat([prompt_codes, new_codes])
    if not all_words:
        raise RuntimeError("the spoken LM generated no words")
    batch = tok.text_tokenizer([" ".join(all_words)])
    a = batch.asr
    taste = tok.embeddings_from_codes(all_codes.to(tok.quantizer.embed.device))
    speaker = unit_features(resample(audio.float(), sample_rate, 16000)).mean(0, keepdim=True)
    units = stage1.decoder.eval().generate(
        a.tokens, a.cu_seqlens, a.max_seqlen, taste=taste, word_offsets=a.word_offsets, speaker=speaker,
        generator=torch.Generator().manual_seed(seed),
    )[0]  # fmt: skip
    return {"prompt_words": words, "new_words": new_words, "prompt_codes": prompt_codes, "new_codes": new_codes,
            "units": units, "wave": units_to_wave(units, centroids)}  # fmt: skip
