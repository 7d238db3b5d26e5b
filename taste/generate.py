"""Batched, KV-cached TASLM generation (spec 2.7) with the text/TASTE state machine vectorised over the batch.

One step per generated row for every sequence at once: the backbone reads one fused row per sequence through a
key/value cache allocated once (transformers' StaticCache); text sampling (banned ids, top-p on the raw logits,
repetition penalty, temperature) and code prediction (RVQ search on the latent, or the classifier) run on the
batch; per-sequence state (words so far, the delay tail, finished) lives in tensors. The host reads nothing back
per step except a "all finished?" check every few steps.

The state machine follows the training layout of :func:`taste.ops.delay_layout` exactly: the step that samples
the first token of word w also predicts the codes of word ``w - delay``, which are fed (fused with that token) at
the next step and carried by every token of word w; after the text ends, ``delay`` tail steps predict the codes of
the last words (their text tokens are discarded). Codes of prompt words are known (speech prompt) or absent (text
prompt: the pad-audio embedding fused as in training; the official text mode feeds plain embeddings without BOS).
Greedy decoding with the cache equals re-running the full sequence every step (``use_cache=False``), and a batch
equals its sequences generated one by one (tests). :class:`GenerationConfig` also has the official instruct mode.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from taste import ops
from taste._checks import check_at_least, check_field_types


@dataclass(frozen=True)
class SamplerTables:
    """Per-id boolean tables ``(V,)`` of a tokenizer (spec 2.7): word starts, banned ids, sentence ends, and its
    special tokens (banned here; the official sampler bans only the end of text among them)."""

    word_start: Tensor
    ban: Tensor
    sentence_end: Tensor
    special: Tensor


_ALLOWED = re.compile(r"[.,'a-zA-Z0-9]")


@functools.lru_cache(maxsize=8)
def sampler_tables(tokenizer: str = "llama3", vocab_size: int | None = None, eos_id: int = 128001) -> SamplerTables:
    """Built once per tokenizer (cached): word start = special id or text starting with a space; banned = no
    character of ``[.,'a-zA-Z0-9]`` (except exactly ".") or a newline, a special id, and ``eos_id``; sentence end =
    contains ".". Ids beyond the tokenizer (a backbone vocabulary padded larger) are banned. Each id's text is what
    it spells (:func:`taste.text.token_bytes`), also for a tokenizer directory: decoding one SentencePiece token
    drops its leading space, which made no token of such a tokenizer a word start, and its special tokens were
    neither banned nor word starts."""
    from taste.text import token_bytes

    spelled = token_bytes(tokenizer)
    n = len(spelled)
    texts = ["" if b is None else b.decode("utf-8", errors="replace") for b in spelled]
    is_special = [b is None for b in spelled]
    v = max(n, vocab_size or 0)
    word_start = torch.zeros(v, dtype=torch.bool)
    ban = torch.ones(v, dtype=torch.bool)
    sentence_end = torch.zeros(v, dtype=torch.bool)
    special = torch.zeros(v, dtype=torch.bool)
    special[:n] = torch.tensor(is_special, dtype=torch.bool)
    for i, t in enumerate(texts):
        word_start[i] = is_special[i] or t.startswith(" ")
        ban[i] = is_special[i] or "\n" in t or (t != "." and _ALLOWED.search(t) is None)
        sentence_end[i] = "." in t
    if 0 <= eos_id < v:
        ban[eos_id] = True
    return SamplerTables(word_start, ban, sentence_end, special)


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """``(R, V)``: every id whose cumulative probability (itself included, in descending order) exceeds ``top_p``
    gets -inf; the most likely id is always kept (spec 2.7)."""
    sorted_logits, order = logits.sort(-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum > top_p
    drop[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling options (spec 2.7; defaults of the official README). ``text_top_p = 0`` is greedy text;
    ``taste_top_p = 0`` greedy codes. ``max_new_tokens`` bounds the text (default 12 tokens per allowed word).

    ``stop_id``: a token that ends the text where it is drawn, as the official ``stop_id``: it is never banned, it is
    not output, and its step predicts the last word's codes (the official code does so only when the stop token
    starts a word, as its special tokens do).

    ``instruct_prefix_ids`` (not None: the official ``instruct`` mode, e.g. spoken question answering): the prompt
    is fed as these ids' plain embeddings, then each prompt's token rows of the training layout without its BOS row
    (a speech prompt's words carry their codes), then ``instruct_suffix_ids``' plain embeddings; the generated words
    start afresh (the first one carries the padding audio, not the prompt's last word).

    ``official_sampling``: the official code's choices where this package differs on purpose: the first generated
    token is drawn from every allowed id (and only counted as a word start), special tokens are allowed (only
    ``eos_id`` is banned among them: their names pass the character rule), and a text prompt (no codes) is fed as
    its tokens' plain embeddings without BOS (the official ``text`` mode). Default: the first token among word
    starts, special tokens banned, a text prompt fed as in training (BOS, each token fused with the padding
    audio)."""

    extra_words: int = 8
    text_top_p: float = 0.3
    text_temperature: float = 0.5
    repetition_penalty: float = 1.1
    taste_top_p: float = 0.0
    max_new_tokens: int | None = None
    stop_id: int | None = None
    instruct_prefix_ids: tuple[int, ...] | None = None
    instruct_suffix_ids: tuple[int, ...] = ()
    official_sampling: bool = False

    def __post_init__(self):
        check_field_types(self)
        check_at_least(self, 1, "extra_words")
        for name in ("instruct_prefix_ids", "instruct_suffix_ids"):
            ids = getattr(self, name)
            if ids is None:
                continue
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
                raise ValueError(f"{name} must be token ids (ints >= 0), got {list(ids)}")
            object.__setattr__(self, name, tuple(ids))  # (a JSON list: hashable and immutable as the rest)
        if self.instruct_suffix_ids and self.instruct_prefix_ids is None:
            raise ValueError("instruct_suffix_ids needs instruct_prefix_ids (() for none): they make the instruct mode")
        if self.stop_id is not None and self.stop_id < 0:
            raise ValueError(f"stop_id must be a token id >= 0, got {self.stop_id}")
        if self.text_temperature <= 0:
            raise ValueError(f"text_temperature must be > 0, got {self.text_temperature}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        for name in ("text_top_p", "taste_top_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] (0: greedy), got {getattr(self, name)}")


@dataclass
class GenerationOutput:
    """Generated text tokens ``(B, T)`` int64 (-1 after a sequence's end), word-start flags ``(B, T)``, codes of
    the generated words ``(B, W, Q)`` int64 (-1 beyond ``num_words``) and ``num_words (B,)``."""

    tokens: Tensor
    word_start: Tensor
    codes: Tensor
    num_words: Tensor

    def words(self, b: int, decode) -> list[str]:
        """The generated words of sequence b (``decode``: list of ids -> str), one per word start."""
        ids = self.tokens[b][self.tokens[b] >= 0].tolist()
        starts = self.word_start[b][self.tokens[b] >= 0].tolist()
        groups: list[list[int]] = []
        for i, s in zip(ids, starts):
            if s or not groups:
                groups.append([])
            groups[-1].append(i)
        return ["".join(decode(g).split()) for g in groups]


def _sample_text(logits: Tensor, seen: Tensor, cfg: GenerationConfig, generator) -> Tensor:
    """``(B, V)`` ban-masked logits -> ``(B,)`` ids: greedy, or top-p -> repetition penalty -> temperature."""
    if cfg.text_top_p <= 0:
        return logits.argmax(-1)
    logits = top_p_filter(logits, cfg.text_top_p)
    rp = cfg.repetition_penalty
    logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    probs = (logits / cfg.text_temperature).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _new_cache(model, batch: int, length: int, device, dtype):
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kw = {"config": model.causal_lm.config, "max_cache_len": length}
    if "max_batch_size" in params:  # transformers 4.x
        kw.update(max_batch_size=batch, device=device, dtype=dtype)
    return StaticCache(**kw)


class _Prompt:
    """Host-side preparation of a packed prompt batch into left-padded prefill rows: per sequence its layout rows
    from BOS to its last token, or in instruct mode the prefix ids' embeddings, its token rows and the suffix's."""

    def __init__(self, model, tokens, cu_seqlens, word_ids, codes, device, prefix=None, suffix=(),
                 plain_text: bool = False):  # fmt: skip
        cu = cu_seqlens.cpu().long()
        lengths = cu.diff()
        self.batch = lengths.numel()
        n = int(cu[-1])
        words = torch.zeros(self.batch, dtype=torch.long)
        if n:
            last = word_ids.cpu().long()[(cu[1:] - 1).clamp(min=0)] + 1
            words = torch.where(lengths > 0, last, words)
        instruct = prefix is not None
        extra = [*(prefix or ()), *suffix]  # instruct mode's plain rows
        self.lengths, self.words = lengths, words
        layout = ops.delay_layout(word_ids.to(device), cu_seqlens.to(device), model.config.delay)
        audio = model.word_audio(codes.to(device)) if codes is not None else None
        rows = model.embed_layout(tokens.to(device), layout, audio)  # (M, hidden)
        body = lengths if instruct else lengths + 1  # the layout rows fed: the tokens' (after BOS), or BOS + tokens
        start = layout.cu_seqlens.cpu().long()[:-1] + int(instruct)
        if plain_text:  # the official text mode: the tokens' plain embeddings, no BOS
            if self.batch and int(lengths.min()) == 0:
                raise ValueError("official_sampling feeds a text prompt without BOS: every prompt needs a token")
            body, start = lengths, rows.shape[0] + cu[:-1]
            rows = torch.cat([rows, model.embed_tokens(tokens.to(device)).to(rows.dtype)])
        m, p = rows.shape[0], len(prefix or ())
        if extra:
            rows = torch.cat([rows, model.embed_tokens(torch.tensor(extra, device=device)).to(rows.dtype)])
        self.size = p + body + len(suffix)  # (B,) prompt rows of each sequence
        if self.batch and int(self.size.min()) == 0:
            raise ValueError("instruct mode needs instruct_prefix_ids or instruct_suffix_ids for an empty prompt")
        self.width = int(self.size.max()) if self.batch else 1
        j = torch.arange(self.width)[None, :] - (self.width - self.size)[:, None]  # (B, P) row j of each prompt
        src = torch.where(j < p, m + j, torch.where(j < p + body[:, None], start[:, None] + j - p,
                                                    m + j - body[:, None]))  # fmt: skip
        valid = j >= 0  # (left padding before)
        self.embeds = rows[src.clamp(min=0, max=rows.shape[0] - 1).to(device)] * valid[..., None].to(device)
        self.valid = valid.to(device)
        self.positions = j.clamp(min=0).to(device)
        self.extra_ids = extra
        self.prompt_audio = None if instruct else audio  # instruct: the first generated word carries the padding
        self.word_base = (words.cumsum(0) - words).to(device)


def _advance(model, h, token, pred, tail, done, n_words, cur_audio, audio_table, out_codes, seen, wp, rows, pad_audio,
             word_start_t, end_t, first, last, delay: int, extra_words: int, stop_id: int | None):  # fmt: skip
    """One step of the state machine once the step's text tokens are drawn: the word starts, the codes of the word
    ``delay`` back (``pred``, or predicted here from ``h`` where no sampler state is involved), the delay tail, the
    stop rules and the next fused input row. ``first``, ``last``: 0-d bool tensors (the first step; the token limit
    reached), so that the compiled version serves every step. Writes ``out_codes``, ``audio_table`` and ``seen`` in
    place; returns (next input (B, 1, hidden), the step's output tokens (-1 outside the text), word-start flags,
    tail, done, n_words, cur_audio)."""
    in_text, in_tail = (tail < 0) & ~done, (tail > 0) & ~done
    if stop_id is not None:  # the stop token ends the text at its own step: not output, the step the first tail step
        halt = in_text & (token == stop_id)
        tail = torch.where(halt, torch.full_like(tail, delay), tail)
        in_text, in_tail = in_text & ~halt, in_tail | halt
    starts = in_text & (word_start_t[token] | first)
    new_word = starts | in_tail
    k = n_words - delay  # the word whose codes this step predicts (when a word starts)
    need = new_word & (k >= wp)
    if pred is None:
        pred = model.predict_codes(h)  # (B, Q)
    slot = (k - wp).clamp(min=0, max=out_codes.shape[1] - 1)
    out_codes[rows, slot] = torch.where(need[:, None], pred, out_codes[rows, slot])
    kk = k.clamp(min=0, max=audio_table.shape[1] - 1)
    audio_table[rows, kk] = torch.where(need[:, None], model.word_audio(pred).to(audio_table.dtype),
                                        audio_table[rows, kk])  # fmt: skip
    fed_audio = torch.where((k >= 0)[:, None], audio_table[rows, kk], pad_audio)
    cur_audio = torch.where(new_word[:, None], fed_audio, cur_audio)
    n_words = n_words + new_word.long()
    token_out = torch.where(in_text, token, -1)
    seen[rows, token] |= in_text
    gen = n_words - wp
    stop = (gen >= extra_words) & end_t[token] | (gen >= 3 * extra_words) | last
    tail = torch.where(in_tail, tail - 1, tail)
    done = done | (in_tail & (tail == 0))
    tail = torch.where(in_text & stop, torch.full_like(tail, delay), tail)
    text = model.embed_tokens(token)
    text = torch.where(in_tail[:, None], model.pad_text_unit_embed.to(text.dtype), text)
    x = model.fuse(text, cur_audio)[:, None]  # (B, 1, hidden)
    return x, token_out, starts, tail, done, n_words, cur_audio


@functools.cache
def _compiled_advance():
    """:func:`_advance` under torch.compile, made once per process (its guards then serve every generation of the
    same shapes). Without CUDA graphs: it writes its inputs in place. What it saves is the host's dispatch of the
    step's many small operators (205 per step in eager mode on the CPU with a tiny model, the RVQ searches' CPU
    reference included), fused into a few kernels."""
    return torch.compile(_advance, dynamic=False)


@torch.no_grad()
def generate(
    model,
    tokens: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    word_ids: Tensor | None = None,
    codes: Tensor | None = None,
    *,
    num_sequences: int | None = None,
    config: GenerationConfig = GenerationConfig(),
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compile: bool = False,
) -> GenerationOutput:
    """Continues a batch of prompts (see :meth:`taste.TasteSpokenLM.generate` for the arguments)."""
    device = model.pad_text_unit_embed.device
    if tokens is None:
        if not num_sequences or num_sequences < 1:
            raise ValueError("without a prompt, num_sequences (>= 1) says how many sequences to generate")
        tokens = torch.zeros(0, dtype=torch.long)
        cu_seqlens = torch.zeros(num_sequences + 1, dtype=torch.int32)
        word_ids, codes = torch.zeros(0, dtype=torch.int32), None
    elif cu_seqlens is None or word_ids is None:
        raise ValueError("a prompt needs tokens, cu_seqlens and word_ids")
    model._check_batch(tokens.cpu(), cu_seqlens.cpu(), word_ids.cpu(), None if codes is None else codes.cpu(),
                       allow_empty=True)  # fmt: skip
    delay, q = model.config.delay, model.config.num_quantizers
    vocab = model.causal_lm.config.vocab_size
    extra = [*(config.instruct_prefix_ids or ()), *config.instruct_suffix_ids]
    for name, ids in (("stop_id", [] if config.stop_id is None else [config.stop_id]), ("instruct ids", extra)):
        if any(i >= vocab for i in ids):
            raise ValueError(f"{name} must lie in [0, vocab_size={vocab}), got {max(ids)}")
    instruct = config.instruct_prefix_ids is not None
    plain_text = config.official_sampling and codes is None and tokens.numel() > 0 and not instruct
    prompt = _Prompt(model, tokens, cu_seqlens, word_ids, codes, device, config.instruct_prefix_ids,
                     config.instruct_suffix_ids, plain_text)  # fmt: skip
    b, width = prompt.batch, prompt.width
    max_words = 3 * config.extra_words + 1
    max_new = config.max_new_tokens or 12 * max_words
    steps = max_new + delay
    tables = sampler_tables(model.config.llm_tokenizer, vocab, model.config.eos_id)
    word_start_t, ban_t, end_t = (t[:vocab].to(device) for t in (tables.word_start, tables.ban, tables.sentence_end))
    if config.official_sampling:  # (a new tensor: the tables are cached)
        ban_t = ban_t & ~tables.special[:vocab].to(device)
        if 0 <= model.config.eos_id < vocab:
            ban_t[model.config.eos_id] = True
    if config.stop_id is not None:
        ban_t = ban_t.clone()
        ban_t[config.stop_id] = False

    # per-word audio: prompt words (codes or pad), then the generated words' code embeddings
    wp = prompt.words.to(device)
    wcap = int(prompt.words.max()) + max_words + delay + 1
    pad_audio = model.pad_audio_unit_embed
    audio_table = pad_audio.expand(b, wcap, -1).clone()  # (B, Wcap, taste_dim)
    if prompt.prompt_audio is not None and prompt.prompt_audio.shape[0]:
        seq_of_word = torch.repeat_interleave(torch.arange(b, device=device), wp)
        idx = torch.arange(seq_of_word.numel(), device=device) - prompt.word_base[seq_of_word]
        audio_table[seq_of_word, idx] = prompt.prompt_audio.to(audio_table.dtype)
    seen = torch.zeros(b, vocab, dtype=torch.bool, device=device)
    if tokens.numel():
        seq_tok = torch.repeat_interleave(torch.arange(b, device=device), prompt.lengths.to(device))
        seen[seq_tok, tokens.to(device)] = True
    if prompt.extra_ids:
        seen[:, torch.tensor(prompt.extra_ids, device=device)] = True

    total = width + steps
    mask = torch.ones(b, total, dtype=torch.long, device=device)
    mask[:, :width] = prompt.valid.long()
    out_tokens = torch.full((b, steps), -1, dtype=torch.long, device=device)
    out_start = torch.zeros(b, steps, dtype=torch.bool, device=device)
    out_codes = torch.full((b, max_words + delay, q), -1, dtype=torch.long, device=device)
    n_words = wp.clone()
    tail = torch.full((b,), -1, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    cur_audio = pad_audio.expand(b, -1).clone()
    rows = torch.arange(b, device=device)
    next_pos = prompt.size.to(device)  # position of the next fed row

    if use_cache:
        cache = _new_cache(model, b, total, device, prompt.embeds.dtype)
        # contiguous, as the steps' rows are: the compiled step guards on strides
        h = model.run_backbone(prompt.embeds, prompt.positions, mask[:, :total], cache)[:, -1].contiguous()
        step_fn = model.run_backbone
        if compile:
            step_fn = torch.compile(model.run_backbone, mode="reduce-overhead" if device.type == "cuda" else None)
    else:
        embeds = prompt.embeds.new_zeros(b, total, prompt.embeds.shape[-1])
        embeds[:, :width] = prompt.embeds
        positions = torch.zeros(b, total, dtype=torch.long, device=device)
        positions[:, :width] = prompt.positions
        h = model.run_backbone(prompt.embeds, prompt.positions, mask[:, :width])[:, -1]

    advance = _compiled_advance() if compile and use_cache else _advance  # use_cache=False: the reference, eager
    # (False, True) for `first` and for `last`: four tensors, so that the compiled step never sees its two flags alias
    first_flag = (torch.tensor(False, device=device), torch.tensor(True, device=device))
    last_flag = (torch.tensor(False, device=device), torch.tensor(True, device=device))
    codes_inside = model.config.head == "latent" or config.taste_top_p <= 0  # no sampler state in the codes
    for s in range(steps):
        logits = model.lm_head(h).float()  # (B, V)
        logits = logits.masked_fill(ban_t, float("-inf"))
        if s == 0 and not config.official_sampling:
            logits = logits.masked_fill(~word_start_t, float("-inf"))
        token = _sample_text(logits, seen, config, generator)
        pred = None if codes_inside else model.predict_codes(h, config.taste_top_p, generator)
        x, out_tokens[:, s], out_start[:, s], tail, done, n_words, cur_audio = advance(
            model, h, token, pred, tail, done, n_words, cur_audio, audio_table, out_codes, seen, wp, rows, pad_audio,
            word_start_t, end_t, first_flag[s == 0], last_flag[s >= max_new - 1], delay, config.extra_words,
            config.stop_id,
        )  # fmt: skip
        col = width + s
        if s == steps - 1 or (s % 8 == 7 and bool(done.all())):
            break
        if use_cache:
            h = step_fn(x, next_pos[:, None], mask[:, :total], cache)[:, -1]
        else:
            embeds[:, col] = x[:, 0]
            positions[:, col] = next_pos
            h = model.run_backbone(embeds[:, : col + 1], positions[:, : col + 1], mask[:, : col + 1])[:, -1]
        next_pos = next_pos + 1
    t = int((out_tokens >= 0).sum(1).max()) if steps else 0  # text steps come before a row's tail steps
    return GenerationOutput(out_tokens[:, :t], out_start[:, :t], out_codes, out_start.sum(1))
