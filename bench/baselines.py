"""Official-style implementations of the alignment steps, written the way the official TASTE code does them
(spec section 6): padded batches, per-sample Python loops, host syncs. They are the baselines of the
benchmarks and an independent cross-check in the tests. Written from the spec's description, not copied.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

PAD_TEXT = -2  # stands for the pad-text embedding in the layouts below


def official_word_spans(word_ids: torch.Tensor, lengths: torch.Tensor) -> list[tuple[int, int, int]]:
    """Spec 1.5 / item 7: run-length encode each padded row of word ids; (b, start, end) of every run with more
    than one subword that ends inside the sequence, read to the host one number at a time."""
    spans = []
    for b in range(word_ids.shape[0]):
        _, counts = torch.unique_consecutive(word_ids[b], return_counts=True)
        ends = counts.cumsum(0)
        length = int(lengths[b].item())
        for r in range(counts.numel()):
            count, end = int(counts[r].item()), int(ends[r].item())
            if count > 1 and end <= length:
                spans.append((b, end - count, end))
    return spans


def official_word_average(x: torch.Tensor, word_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Spec 1.5 / item 8: every subword of a multi-subword word gets the word's mean, one span at a time.

    x: (B, S, D) padded; word_ids: (B, S) padded with 0; lengths: (B,). Returns (B, S, D).
    """
    out = x.clone()
    for b, start, end in official_word_spans(word_ids, lengths):
        out[b, start:end] = x[b, start:end].mean(dim=0)
    return out


def official_prepare_single(token_ids, word_ids, codes_at_starts, delay: int = 1):
    """Spec 2.4 / item 22 for one utterance: the word-delay layout built with nonzero and per-word host reads.

    token_ids, word_ids: (L,); codes_at_starts: (L, Q), the word's codes on its first token, -1 elsewhere.
    Returns the text stream (L + delay,) (PAD_TEXT on the tail), the audio code stream (L + delay, Q)
    (-1 = pad audio), the text labels (L + delay + 1,) and the TASTE labels (L + delay + 1, Q), -1 = ignore.
    """
    L, Q = codes_at_starts.shape
    dev = token_ids.device
    is_start = torch.ones(L, dtype=torch.bool, device=dev)
    is_start[1:] = word_ids[1:] != word_ids[:-1]
    starts = torch.nonzero(is_start).flatten()
    W = starts.numel()
    audio = torch.full((L + delay, Q), -1, dtype=torch.long, device=dev)
    taste_labels = torch.full((L + delay + 1, Q), -1, dtype=torch.long, device=dev)
    for w in range(W):
        code = codes_at_starts[int(starts[w])]
        target = w + delay  # the word whose tokens carry word w's code
        if target < W:
            first = int(starts[target])
            last = int(starts[target + 1]) if target + 1 < W else L
        else:
            first = L + target - W
            last = first + 1
        audio[first:last] = code
        taste_labels[first] = code
    text = torch.cat([token_ids.long(), torch.full((delay,), PAD_TEXT, dtype=torch.long, device=dev)])
    text_labels = torch.cat([token_ids.long(), torch.full((delay + 1,), -1, dtype=torch.long, device=dev)])
    return text, audio, text_labels, taste_labels


def official_prepare_batch(token_ids, word_ids, codes_at_starts, lengths, delay: int = 1):
    """Spec 2.4 / item 23: the per-sample layouts of a padded batch, right-padded again (inputs 0, labels -1)."""
    parts = [
        official_prepare_single(token_ids[b, :n], word_ids[b, :n], codes_at_starts[b, :n], delay)
        for b, n in enumerate(int(v.item()) for v in lengths)
    ]
    text, audio, text_labels, taste_labels = zip(*parts)
    return (
        pad_sequence(text, batch_first=True, padding_value=0),
        pad_sequence(audio, batch_first=True, padding_value=-1),
        pad_sequence(text_labels, batch_first=True, padding_value=-1),
        pad_sequence(taste_labels, batch_first=True, padding_value=-1),
        torch.tensor([n + delay + 1 for n in (int(v.item()) for v in lengths)], dtype=torch.int32),
    )


def padded_aggregator(agg, ids, h_key, h_val, self_attention, cross_attention):
    """The aggregator of spec 1.4 on a padded batch, with pluggable attention: the shape of the official code.

    agg: a taste.TextQueryAggregator (its weights are used); ids: (B, S) prefixed token ids, padded;
    self_attention(q, k, v) / cross_attention(q, k, v) take (B, H, S, Dh) / (B, H, E, Dh) tensors.
    Returns the final-LayerNorm output (B, S, d).
    """
    B, S = ids.shape
    H = agg.config.num_heads
    positions = torch.arange(S, device=ids.device)
    x = agg.embed_tokens(ids) + agg.embed_positions(positions)[None]

    def heads(t):
        return t.view(t.shape[0], t.shape[1], H, -1).transpose(1, 2)  # (B, H, T, Dh)

    def merge(t):
        return t.transpose(1, 2).reshape(B, S, -1)

    for layer in agg.layers:
        a = layer.self_attn
        h = layer.self_attn_layer_norm(x)
        x = x + a.out_proj(merge(self_attention(heads(a.q_proj(h)), heads(a.k_proj(h)), heads(a.v_proj(h)))))
        a = layer.encoder_attn
        h = layer.encoder_attn_layer_norm(x)
        attn = cross_attention(heads(a.q_proj(h)), heads(a.k_proj(h_key)), heads(a.v_proj(h_val)))
        x = x + a.out_proj(merge(attn))
        x = x + layer.fc2(torch.nn.functional.gelu(layer.fc1(layer.final_layer_norm(x))))
    return agg.layer_norm(x)


def eager_attention(q, k, v, mask=None):
    """HF 'eager' attention: the full (B, H, S, T) score and probability tensors, softmax in float32."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v


def espnet_rel_attention(qu, qv, k, v, p_both, mask):
    """ESPnet's ``rel_selfattn`` as the official unit decoder runs it (spec 1.7): position scores over all 2T-1
    relative offsets ``+(T-1)..-(T-1)`` (``p_both`` ``(H, 2T-1, d_k)``, projected), aligned by the Transformer-XL
    ``rel_shift`` (pad a zero column, reshape, drop a row, keep T columns), the full score and probability
    tensors, softmax in float32. ``qu``/``qv`` ``(B, H, T, d_k)`` carry pos_bias_u / pos_bias_v."""
    b, h, t, _ = qu.shape
    ac = qu @ k.transpose(-1, -2)  # (B, H, T, T)
    bd = qv @ p_both.transpose(-1, -2)  # (B, H, T, 2T-1)
    shifted = torch.cat([bd.new_zeros(b, h, t, 1), bd], -1).view(b, h, 2 * t, t)
    bd = shifted[:, :, 1:].reshape(b, h, t, 2 * t - 1)[..., :t]
    scores = ((ac + bd) / qu.shape[-1] ** 0.5).masked_fill(~mask[:, None], float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


def official_prefixed_ids(tokens_pad, prefix_ids):
    """Spec 1.4: prefix ++ padded tokens (pad 0) ++ EOS 50257-style end token after the padding (inert)."""
    B = tokens_pad.shape[0]
    prefix = torch.tensor(prefix_ids, device=tokens_pad.device).expand(B, -1)
    eos = torch.full((B, 1), prefix_ids[0] - 1, device=tokens_pad.device, dtype=tokens_pad.dtype)
    return torch.cat([prefix, tokens_pad, eos], dim=1)


class CdistLoop(torch.nn.Module):
    """The plain way: project, then per stage torch.cdist + argmin over the full (N, K) matrix (ours: a
    taste.ResidualVQ whose projections and codebooks are used). In training, the EMA update of the codebooks the
    plain way too (per stage bincount + index_add_, atomics on CUDA), into ours' buffers as ours' own step does."""

    def __init__(self, ours):
        super().__init__()
        self.ours = ours

    def forward(self, x):
        z = self.ours.project_in(x)
        residual, quantized, loss, indices, stats = z, 0.0, 0.0, [], []
        for codebook in self.ours.embed:
            idx = torch.cdist(residual, codebook).argmin(-1)
            chosen = codebook[idx]
            quantized = quantized + residual + (chosen - residual).detach()
            loss = loss + (chosen.detach() - residual).square().mean()
            if self.ours.training:
                stage_input = residual.detach()
                sums = stage_input.new_zeros(codebook.shape).index_add_(0, idx, stage_input)
                stats.append((torch.bincount(idx, minlength=codebook.shape[0]).to(sums.dtype), sums))
            residual = residual - chosen.detach()
            indices.append(idx)
        if stats:
            self._ema_update(torch.stack([c for c, _ in stats]), torch.stack([s for _, s in stats]))
        return self.ours.project_out(quantized), torch.stack(indices, 1), loss

    @torch.no_grad()
    def _ema_update(self, counts, sums):
        rvq = self.ours
        rvq.cluster_size.lerp_(counts, 1.0 - rvq.decay)
        rvq.embed_avg.lerp_(sums, 1.0 - rvq.decay)
        total = rvq.cluster_size.sum(-1, keepdim=True)
        smoothed = (rvq.cluster_size + rvq.eps) / (total + rvq.codebook_size * rvq.eps) * total
        rvq.embed.copy_(rvq.embed_avg / smoothed[..., None])

    def search(self, z):
        """The stages' cdist + argmin on given codes z (no projections, no loss): indices (N, Q)."""
        indices = []
        for codebook in self.ours.embed:
            indices.append(torch.cdist(z, codebook).argmin(-1))
            z = z - codebook[indices[-1]]
        return torch.stack(indices, 1)

    def get_output_from_indices(self, indices):
        code = sum(cb[indices[:, s]] for s, cb in enumerate(self.ours.embed))
        return self.ours.project_out(code)


def official_frontend(model, waveforms):
    """Spec 1.2 the official way: pad or trim each 16 kHz waveform to the window, one STFT per utterance."""
    window = model.frontend.window_samples
    mels = []
    for w in waveforms:
        audio = w.new_zeros(window)
        audio[: w.numel()] = w[:window]
        mels.append(model.frontend(audio[None])[0])
    return torch.stack(mels)


def official_codes_from_states(model, h_key, h_val, texts, encode_word):
    """Spec 1.1 and 1.4-1.6 the official way, from the encoder states: per-utterance per-word tokenisation padded
    with 0, the padded eager aggregator with the prefix and an EOS after the padding, the span-loop word average
    at subword level (EOS column dropped), an unfused cdist VQ on every subword, then the code of each word's
    first subword. Returns B int64 tensors (W_i, Q)."""
    ids, word_ids = [], []
    for text in texts:
        tokens, wids = [], []
        for w, word in enumerate(text.split()):
            piece = encode_word(" " + word)
            tokens += piece
            wids += [w] * len(piece)
        ids.append(torch.tensor(tokens))
        word_ids.append(torch.tensor(wids))
    dev = h_key.device
    lengths = torch.tensor([t.numel() for t in ids])
    tok_pad = pad_sequence(ids, batch_first=True, padding_value=0).to(dev)
    wid_pad = pad_sequence(word_ids, batch_first=True, padding_value=0).to(dev)
    agg = model.aggregator
    prefixed = official_prefixed_ids(tok_pad, agg.config.prefix_ids)
    causal = torch.ones(prefixed.shape[1], prefixed.shape[1], dtype=torch.bool, device=dev).tril()
    out = padded_aggregator(
        agg, prefixed, h_key, h_val, lambda q, k, v: eager_attention(q, k, v, causal), eager_attention
    )
    P = len(agg.config.prefix_ids)
    z = official_word_average(out[:, P:-1], wid_pad, lengths)  # (B, S, d)
    valid = torch.arange(z.shape[1], device=dev)[None] < lengths.to(dev)[:, None]
    _, codes, _ = CdistLoop(model.quantizer)(z[valid].float())  # (S_total, Q)
    result, start = [], 0
    for b, n in enumerate(lengths.tolist()):
        wid = word_ids[b]
        first = torch.ones(n, dtype=torch.bool)
        first[1:] = wid[1:] != wid[:-1]
        result.append(codes[start : start + n][first.to(dev)].cpu())
        start += n
    return result


def hf_whisper_encoder(model):
    """transformers' WhisperEncoder with the weights of ``model.encoder`` (what the official code runs), as a
    function mel -> (h_key, h_val) that keeps every hidden state as the official forward does."""
    import transformers
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    c = model.encoder.config
    if c.value_layer >= c.num_layers:
        raise ValueError("transformers' last hidden_states entry is after the final LayerNorm: value_layer too deep")
    config = transformers.WhisperConfig(
        num_mel_bins=c.n_mels, d_model=c.d_model, encoder_layers=c.num_layers, encoder_attention_heads=c.num_heads,
        encoder_ffn_dim=c.ffn_dim, max_source_positions=c.frames,
    )  # fmt: skip
    hf = WhisperEncoder(config).to(next(model.encoder.parameters()).device).eval()
    hf.load_state_dict(model.encoder.state_dict())

    def encode(mel):
        out = hf(mel, output_hidden_states=True)
        return out.last_hidden_state, out.hidden_states[c.value_layer]

    return encode


def official_tokenizer_codes(model, waveforms, texts, encode_word, encoder=None):
    """The TASTE tokenizer the way the official code runs it (spec 1.1-1.6, items 1-10 of section 6), with the
    weights of ``model`` (a taste.TasteTokenizer in eval mode): :func:`official_frontend`, the encoder on the
    padded batch (``encoder``: mel -> (h_key, h_val), default ``model.encoder``), then
    :func:`official_codes_from_states`.

    waveforms: B 1-D float tensors at 16 kHz; texts: B strings; encode_word: str -> list of ASR ids.
    Returns B int64 tensors (W_i, Q).
    """
    h_key, h_val = (encoder or model.encoder)(official_frontend(model, waveforms))
    return official_codes_from_states(model, h_key, h_val, texts, encode_word)


@torch.no_grad()
def official_sampler_ban(vocab: int) -> torch.Tensor:
    """The official ``TasteSampler``'s banned ids over the Llama-3 vocabulary, by its own rule on each id's decoded
    text: none of ``[.,'a-zA-Z0-9]`` (but ".") or a newline, and 128001; special tokens decode to their names, which
    pass. Ids past the tokenizer (a larger embedding) are banned."""
    import re

    from taste.text import llama3_encoding

    enc = llama3_encoding()
    ban = torch.ones(vocab, dtype=torch.bool)
    for i in range(min(vocab, enc.n_vocab)):
        text = enc.decode([i])
        ban[i] = text != "." and (re.search(r"[.,'a-zA-Z0-9]", text) is None or "\n" in text)
    ban[128001] = True
    return ban


def official_generate(model, tokens, word_ids, codes, *, extra_words: int, max_new_tokens: int, prefix_ids=None,
                      suffix_ids=(), stop_id: int | None = None, official_sampling: bool = False):  # fmt: skip
    """The official TASLM generation algorithm (spec 2.7, 2.8) on the same weights, greedy, batch 1: the sampler
    tables rebuilt per call, the whole sequence re-run through the backbone at every step without a cache, lm_head
    and the code head + RVQ search on every position, the ban mask written into the full logits, the state machine
    in Python with a host read per step, inputs grown by concatenation. Returns (tokens, codes) of the new words.

    ``prefix_ids`` (not None): the official ``instruct`` mode (``TasteSpokenLM.generate``, ``conditional_mode ==
    "instruct"``): the prefix ids' plain embeddings, the prompt's layout rows without BOS, the suffix ids'; no
    queued prompt audio (``has_prefix=False``: the first generated word carries the padding audio). ``stop_id``: the
    sampler's stop rule (the stop token ends the text at its own step, is not output, and that step samples the last
    word's codes when the stop token is a word start); the stop id is not banned.

    ``codes`` None: a text prompt. Three choices of this package are kept here as in ``taste.generate`` unless
    ``official_sampling`` (then as the official code): the first generated token is drawn among word starts only
    (officially it is only counted as one), special tokens are banned (officially only 128001 is: the ban of
    :func:`official_sampler_ban`), and a text prompt is fed as training feeds it (officially: its tokens' plain
    embeddings without BOS)."""
    from taste import ops
    from taste.generate import sampler_tables

    if model.config.delay != 1:
        raise ValueError("the official algorithm has delay 1")
    tables = sampler_tables.__wrapped__(model.config.llm_tokenizer, model.causal_lm.config.vocab_size,
                                        model.config.eos_id)  # fmt: skip
    vocab = model.causal_lm.config.vocab_size
    dev = tokens.device
    ban, word_start, sentence_end = (t[:vocab].to(dev) for t in (tables.ban, tables.word_start, tables.sentence_end))
    if official_sampling:
        ban = official_sampler_ban(vocab).to(dev)
    cu = torch.tensor([0, tokens.numel()], dtype=torch.int32, device=dev)
    layout = ops.delay_layout(word_ids, cu, 1)
    audio = None if codes is None else model.word_audio(codes)
    embeds = model.embed_layout(tokens, layout, audio)[: tokens.numel() + 1]  # BOS + the prompt's rows

    def plain(ids):
        return model.embed_tokens(torch.as_tensor(list(ids), dtype=torch.long, device=dev)).to(embeds.dtype)

    # the prompt's last word, queued for the first generated word (speech prompt); the padding in the other modes
    cur_audio = model.pad_audio_unit_embed if codes is None else audio[-1]
    if prefix_ids is not None:
        embeds = torch.cat([plain(prefix_ids), embeds[1:], plain(suffix_ids)])
        cur_audio = model.pad_audio_unit_embed
    elif codes is None and official_sampling:  # the official text mode
        embeds = plain(tokens.tolist())
    if stop_id is not None:
        ban = ban.clone()
        ban[stop_id] = False
    out_tokens, out_codes, words, final = [], [], 0, False
    while True:
        h = model.run_backbone(embeds[None], torch.arange(embeds.shape[0], device=dev)[None])[0]
        logits = model.lm_head(h).float()
        logits[:, ban] = -100000.0
        if not out_tokens and not official_sampling:
            logits[-1, ~word_start] = -100000.0
        all_codes = model.predict_codes(h)  # every position, as the official head
        token = int(logits[-1].argmax())
        if final:
            out_codes.append(all_codes[-1])
            break
        if stop_id is not None and token == stop_id:  # the terminating step
            if bool(word_start[token]) and words + 1 > 1:
                out_codes.append(all_codes[-1])
            break
        is_start = not out_tokens or bool(word_start[token])
        if is_start:
            words += 1
            if words > 1:
                out_codes.append(all_codes[-1])
                cur_audio = model.word_audio(all_codes[-1:])[0]
        out_tokens.append(token)
        final = (words >= extra_words and bool(sentence_end[token])) or words >= 3 * extra_words
        final = final or len(out_tokens) >= max_new_tokens
        text = model.embed_tokens(torch.tensor([token], device=dev))
        embeds = torch.cat([embeds, model.fuse(text, cur_audio[None])])
    q = model.config.num_quantizers
    codes = torch.stack(out_codes) if out_codes else torch.zeros(0, q, dtype=torch.long, device=dev)
    return torch.tensor(out_tokens, dtype=torch.long), codes


@torch.no_grad()
def official_unit_generate(model, prompt, min_len: int, max_len: int):
    """The official unit decoder's inference (spec 1.7 and 2.8) on the weights of ``model`` (a taste.UnitDecoder in
    eval mode), greedy, batch 1: every layer's cache grown by concatenation at each step, the relative-position
    table of the current length projected in every layer at every step (as ESPnet's attention does), a host read
    per step. EOS is banned before ``min_len`` units (the official code re-samples it: greedy, banning picks the
    same) and generation stops at ``max_len``. ``prompt``: ``(1, L, d)`` from ``model.prompt``. Returns the units
    (EOS not included)."""
    from taste.relpos import relative_sinusoids

    dev, length = prompt.device, prompt.shape[1]
    table = relative_sinusoids(length + max_len + 1, model.config.d_model, dev, prompt.dtype)
    caches = [None] * len(model.llm.encoders)
    x, positions, units = model.llm.embed_input(prompt), torch.arange(length, device=dev)[None], []
    while True:
        keys = int(positions[0, -1]) + 1
        mask = torch.arange(keys, device=dev)[None, None] <= positions[..., None]
        for i, layer in enumerate(model.llm.encoders):
            h = layer.norm1(x)
            k, v = layer.self_attn.project_kv(h)
            if caches[i] is not None:
                k, v = torch.cat([caches[i][0], k], 2), torch.cat([caches[i][1], v], 2)
            caches[i] = (k, v)
            p = layer.self_attn.project_positions(table[:keys])
            x = x + layer.self_attn.attend(h, k, v, mask, positions, p)
            x = x + layer.feed_forward(layer.norm2(x))
        logits = model.llm_decoder(model.llm.after_norm(x[:, -1])).float()
        if len(units) < min_len:
            logits[:, model.config.eos] = float("-inf")
        token = int(logits.argmax(-1))
        if token == model.config.eos:
            break
        units.append(token)
        if len(units) >= max_len:
            break
        x = model.llm.embed_input(model.speech_embedding(torch.tensor([[token]], device=dev)))
        positions = torch.tensor([[length + len(units) - 1]], device=dev)
    return torch.tensor(units, dtype=torch.long)
