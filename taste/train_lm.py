"""TASLM training (spec 2.6, 3.1 stage 2): the spoken LM learns text and TASTE codes together from the per-word
codes of a trained tokenizer (``taste encode`` output), through the loop of :mod:`taste.trainer` (checkpoints and
exact resume, accumulation, bf16 on CUDA, torchrun DDP). Only the trainable weights (LoRA, bridges, heads) and the
RVQ are saved when the backbone comes from ``backbone_path``; :meth:`taste.TasteSpokenLM.merge_lora` folds the
adapters in for deployment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

from taste._checks import check_positive_int
from taste.checkpoint import iter_json_objects
from taste.spoken_lm import SpokenLMConfig, TasteSpokenLM
from taste.text import WordTokenizer
from taste.trainer import LoopConfig, fit, setup_distributed

PRESETS = ("tiny", "llama_3_2_1b")


@dataclass(kw_only=True)
class LMTrainConfig(LoopConfig):
    """A TASLM run (the loop options of :class:`taste.trainer.LoopConfig` plus these)."""

    codes: str  # `taste encode` JSONL: one row per utterance with "words" and "codes" (W x Q)
    tokenizer: str  # the TasteTokenizer directory that produced the codes (its RVQ becomes the LM's)
    init_from: str | None = None  # a previous train-lm out_dir (its final/) or a TasteSpokenLM directory
    preset: str = "tiny"  # SpokenLMConfig preset when not init_from
    model: dict = field(default_factory=dict)  # SpokenLMConfig overrides, e.g. {"lora_r": 0, "head": "classifier"}
    lr: float = 5e-4

    def __post_init__(self):
        super().__post_init__()
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")


def code_row(where: str, row: dict, num_quantizers: int | None = None, codebook_size: int | None = None,
             codebooks: str | None = None) -> tuple[list[str], Tensor]:  # fmt: skip
    """A codes row's ``(words, codes (W, Q) int64)``, checked against a model's codebooks (their digest, layers and
    size, where given); ``where`` names the row in errors."""
    words, codes = row.get("words"), torch.tensor(row.get("codes", []), dtype=torch.long)
    if not words or codes.dim() != 2 or codes.shape[0] != len(words):
        raise ValueError(f"{where}: needs 'words' and one 'codes' row per word")
    if codebooks is not None and row.get("codebooks", codebooks) != codebooks:  # (rows without: unchecked)
        raise ValueError(f"{where}: codes of codebooks {row['codebooks']}, but the model's are {codebooks} "
                         "(another tokenizer's codes, or another training's: encode them with the tokenizer "
                         "that the model took its RVQ from)")  # fmt: skip
    if num_quantizers is not None and codes.shape[1] != num_quantizers:
        raise ValueError(f"{where}: codes have {codes.shape[1]} layers, the model has {num_quantizers}")
    lo, hi = (int(codes.min()), int(codes.max())) if codes.numel() else (0, 0)
    if codebook_size is not None and (lo < -1 or hi >= codebook_size):  # (else: rvq_decode's error, unnamed)
        raise ValueError(f"{where}: codes must lie in [-1, {codebook_size}) (the model's codebook size; -1: "
                         f"none), got [{lo}, {hi}]")  # fmt: skip
    return words, codes


class CodeCorpus:
    """Utterances of a ``taste encode`` JSONL as Llama tokens, word ids and per-word codes, and packed batches."""

    def __init__(self, path: str, llm_tokenizer: str = "llama3", num_quantizers: int | None = None,
                 codebook_size: int | None = None, codebooks: str | None = None):  # fmt: skip
        tok = WordTokenizer(llm_tokenizer)
        self.tokens, self.word_ids, self.codes, self.words, self.ids = [], [], [], [], []
        for where, row in iter_json_objects(path, "codes row"):
            words, codes = code_row(where, row, num_quantizers, codebook_size, codebooks)
            packed = tok.pack([words])
            self.tokens.append(packed.tokens)
            self.word_ids.append(packed.word_ids)
            self.codes.append(codes)
            self.words.append(words)
            self.ids.append(row.get("id"))
        if not self.tokens:
            raise ValueError(f"{path} holds no utterances")

    @classmethod
    def for_model(cls, path: str, model: TasteSpokenLM) -> CodeCorpus:
        """The codes of ``path`` checked against ``model``: its LLM tokenizer, codebook shape and codebooks."""
        c = model.config
        return cls(path, c.llm_tokenizer, c.num_quantizers, c.codebook_size, codebooks=model.vq.codebook_digest())

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, indices: list[int], device) -> dict:
        lengths = torch.tensor([self.tokens[i].numel() for i in indices])
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
        return {
            "tokens": torch.cat([self.tokens[i] for i in indices]).to(device),
            "cu_seqlens": cu.to(device),
            "word_ids": torch.cat([self.word_ids[i] for i in indices]).to(device),
            "codes": torch.cat([self.codes[i] for i in indices]).to(device),
        }


def build_model(cfg: LMTrainConfig) -> TasteSpokenLM:
    if cfg.init_from:
        return TasteSpokenLM.from_pretrained(cfg.init_from)
    from taste.tokenizer import TasteTokenizer

    tokenizer = TasteTokenizer.from_pretrained(cfg.tokenizer)
    base = getattr(SpokenLMConfig, cfg.preset)(**cfg.model)
    return TasteSpokenLM.from_tokenizer(tokenizer, base)


@torch.no_grad()
def evaluate_lm(model: TasteSpokenLM, corpus: CodeCorpus, indices: list[int], batch_size: int = 16,
                train_indices: list[int] | None = None) -> dict:  # fmt: skip
    """Teacher-forced metrics on ``indices`` (spec 2.6): text loss and accuracy, per-layer code accuracy and the
    MSE between predicted and target code sums, averaged over utterance batches weighted by their size. With
    ``train_indices``, the floors a model that learnt nothing about speech reaches: the accuracy of always
    answering each layer's most frequent training code (``code_accuracy_majority_{q}``) and the MSE of always
    answering the mean training code sum (``taste_mse_mean_floor``)."""
    check_positive_int(batch_size, "batch_size")
    was = model.training
    model.eval()
    device = model.pad_text_unit_embed.device
    sums, n = {}, 0
    try:
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            out = model(**corpus.batch(idx, device))
            values = {"text_loss": out.text_loss, "text_accuracy": out.text_accuracy, "taste_mse": out.taste_mse}
            values.update({f"code_accuracy_{q}": a for q, a in enumerate(out.code_accuracy)})
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
            n += len(idx)
    finally:
        model.train(was)
    metrics = {k: v / max(n, 1) for k, v in sums.items()}
    if train_indices:
        train_codes = torch.cat([corpus.codes[i] for i in train_indices])
        held = torch.cat([corpus.codes[i] for i in indices])
        for q in range(train_codes.shape[1]):
            majority = torch.bincount(train_codes[:, q].clamp(min=0)).argmax()
            metrics[f"code_accuracy_majority_{q}"] = float((held[:, q] == majority).float().mean())
        vq = model.vq
        mean = vq.get_code_from_indices(train_codes.to(vq.embed.device)).mean(0)
        metrics["taste_mse_mean_floor"] = float((vq.get_code_from_indices(held.to(mean.device)) - mean).pow(2).mean())
    return metrics


@torch.no_grad()
def score_corpus(model: TasteSpokenLM, corpus: CodeCorpus, batch_size: int = 16, *, text_only: bool = False) -> list:
    """Per row of ``corpus``: ``{"id", "text_logprob", "taste_logprob", "tokens", "words"}``, the sums of
    :meth:`taste.TasteSpokenLM.score` (the model in eval mode while it runs; ``text_only``: the text without its
    codes, ``taste_logprob`` 0)."""
    check_positive_int(batch_size, "batch_size")
    was = model.training
    model.eval()
    device = model.pad_text_unit_embed.device
    rows = []
    try:
        for start in range(0, len(corpus), batch_size):
            idx = list(range(start, min(start + batch_size, len(corpus))))
            batch = corpus.batch(idx, device)
            s = model.score(**{**batch, "codes": None} if text_only else batch)
            values = zip(s.text.tolist(), s.taste.tolist(), s.num_tokens.tolist(), s.num_words.tolist())
            for i, (text, taste, tokens, words) in zip(idx, values):
                rows.append({"id": corpus.ids[i], "text_logprob": text, "taste_logprob": taste, "tokens": tokens,
                             "words": words})  # fmt: skip
    finally:
        model.train(was)
    return rows


def preference_accuracy(first: list, second: list, *, per_token: bool = False) -> dict:
    """How often the scores of :func:`score_corpus` prefer row ``i`` of ``first`` (the right answer: the true
    ending, the consistent recording) to row ``i`` of ``second``, as spoken StoryCloze and SALMON count: by the text
    log-likelihood, the TASTE one and their sum (a tie counts half). ``per_token``: the text divided by its tokens
    and the TASTE term by its scored words first (their sum then compares the two means)."""
    if len(first) != len(second) or not first:
        raise ValueError(f"the two score lists must pair up row by row, got {len(first)} and {len(second)} rows")

    def terms(r):
        text, taste = r["text_logprob"], r["taste_logprob"]
        if per_token:
            text, taste = text / max(r["tokens"], 1), taste / max(r["words"], 1)
        return {"text": text, "taste": taste, "total": text + taste}

    wins = {"text": 0.0, "taste": 0.0, "total": 0.0}
    for a, b in zip(first, second):
        ta, tb = terms(a), terms(b)
        for k in wins:
            wins[k] += 1.0 if ta[k] > tb[k] else 0.5 if ta[k] == tb[k] else 0.0
    return {"pairs": len(first), **{f"accuracy_{k}": v / len(first) for k, v in wins.items()}}


def train_lm(cfg: LMTrainConfig, *, stop_after: int | None = None, progress: bool = True) -> TasteSpokenLM:
    """Runs (or resumes) a TASLM run; at the end writes ``final/`` and ``final/eval.json`` (held-out rows)."""
    _, rank, _, device = setup_distributed()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg)
    corpus = CodeCorpus.for_model(cfg.codes, model)
    if len(corpus) <= cfg.eval_size:
        raise ValueError(f"{cfg.codes} has {len(corpus)} rows, not more than eval_size={cfg.eval_size}")
    model.to(device).train()

    def compute(module, batch):
        return module(**batch).loss, int(batch["tokens"].numel())

    train_idx = list(range(len(corpus) - cfg.eval_size))
    fit(cfg, model, lengths=[t.numel() for t in corpus.tokens], train_idx=train_idx,
        make_batch=lambda idx: corpus.batch(idx, device), compute=compute, reload=TasteSpokenLM.from_pretrained,
        stop_after=stop_after, progress=progress, count_name="tokens")  # fmt: skip
    final = os.path.join(cfg.out_dir, "final")
    if rank == 0 and os.path.isdir(final) and cfg.eval_size:
        held = list(range(len(corpus) - cfg.eval_size, len(corpus)))
        metrics = evaluate_lm(model, corpus, held, cfg.batch_size, train_indices=train_idx)
        with open(os.path.join(final, "eval.json"), "w") as f:
            json.dump({**metrics, "config": dataclasses.asdict(cfg)}, f, indent=2)
    return model
