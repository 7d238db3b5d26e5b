"""TASLM's parts around TASTE (spec 2.1, 2.3, 2.5, 2.6): the backbone (+ LoRA) and the bridges, with the official
names: the input fusion (``fuse_for_bridge_in_llm``) and the output heads (``extract_for_bridge_out_llm``) with
their losses."""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightedSumFusion(nn.Module):
    """in = a_a * (W a + b) + a_t * e with (a_a, a_t) = softmax(weights) (spec 2.3); float32 inside."""

    def __init__(self, taste_dim: int, hidden: int, init: tuple):
        super().__init__()
        self.weights = nn.Parameter(torch.tensor(init, dtype=torch.float32))
        self.linear = nn.Linear(taste_dim, hidden)

    def forward(self, text: Tensor, audio: Tensor) -> Tensor:
        """``text (R, hidden)`` (any float dtype), ``audio (R, taste_dim)`` -> ``(R, hidden)`` in text's dtype."""
        alpha = self.weights.softmax(0)
        return (alpha[0] * self.linear(audio.to(self.linear.weight.dtype)) + alpha[1] * text.float()).to(text.dtype)


class LatentHead(nn.Module):
    """``continue_latent_linear_last`` (TASLM_emb): mu = W h + b, a learned log-variance vector."""

    def __init__(self, hidden: int, codebook_dim: int):
        super().__init__()
        self.fc_mu = nn.Linear(hidden, codebook_dim)
        self.b_logvar = nn.Parameter(torch.zeros(codebook_dim))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(R, hidden)`` -> ``mu (R, d)`` float32 and ``logvar (d,)``."""
        return self.fc_mu(h.float()), self.b_logvar

    def loss(self, h: Tensor, y: Tensor, valid: Tensor, *, official: bool = False) -> Tensor:
        """0.5 MSE(z, y) + 0.5 KL(N(mu, sigma^2) || N(y, 1)) over the ``valid (R,)`` rows of the target code sums
        ``y (R, d)``, z the reparameterised sample. ``official``: the sample carries the gradient of mu + sigma."""
        mu, logvar = self(h)
        sigma = (0.5 * logvar).exp()
        eps = torch.randn_like(mu)
        if official:  # forward value: a sample; gradient: that of mu + sigma
            z = (mu + sigma) + (mu + sigma * eps - (mu + sigma)).detach()
        else:
            z = mu + sigma * eps
        y = y.detach()
        rows = valid[:, None].float()
        denom = valid.sum().clamp(min=1) * y.shape[1]
        reg = ((z - y).pow(2) * rows).sum() / denom
        kl = 0.5 * ((sigma.pow(2) + (mu - y).pow(2) - 1 - logvar) * rows).sum() / denom
        return 0.5 * reg + 0.5 * kl


class ClassifierHead(nn.Module):
    """``linear_last`` (TASLM_token): ``(R, hidden) -> (R, Q, K)`` logits."""

    def __init__(self, hidden: int, num_quantizers: int, codebook_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden, num_quantizers * codebook_size)
        self.shape = (num_quantizers, codebook_size)

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(h.float()).view(-1, *self.shape)

    def loss(self, h: Tensor, codes: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-entropy averaged over the Q layers and the rows whose codes are all valid, and the argmax codes."""
        logits = self(h)  # (R, Q, K)
        valid = (codes >= 0).all(-1)
        ce = F.cross_entropy(logits.flatten(0, 1), codes.clamp(min=0).flatten(), reduction="none")
        loss = (ce.view(codes.shape) * valid[:, None]).sum() / (valid.sum().clamp(min=1) * codes.shape[1])
        return loss, logits.detach().argmax(-1)


def _linear_names(model: nn.Module) -> list[str]:
    """The names of every nn.Linear inside the LM but its output layer (q/k/v/o and gate/up/down for Llama), as
    the official ``_find_all_linear_names``; works for any transformers causal LM family."""
    output = model.get_output_embeddings()
    return sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output})


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_PROBE = "Hello world, this is TASLM's probe: 42 words & naïve café."


def check_llm_tokenizer(config, vocab_size: int) -> None:
    """Refuses a ``config.llm_tokenizer`` whose ids cannot be the backbone's: word ids past its ``vocab_size``
    embedding rows, BOS / EOS ids outside them, or, for a backbone directory that ships a tokenizer, other ids for
    the same words than that tokenizer's (``"llama3"`` over a Qwen checkpoint, whose embedding is larger, gave no
    error, only wrong tokens)."""
    from taste.text import WordTokenizer

    try:
        tok = WordTokenizer(config.llm_tokenizer)
    except (OSError, ValueError) as e:  # (a directory moved since the model was saved: the model still loads)
        warnings.warn(f"taste: llm_tokenizer {config.llm_tokenizer!r} could not be loaded ({e}); its ids are not "
                      "checked against the backbone's", stacklevel=3)  # fmt: skip
        return
    if tok.word_id_bound > vocab_size:
        raise ValueError(f"llm_tokenizer {config.llm_tokenizer!r} tokenises words into ids up to "
                         f"{tok.word_id_bound - 1}, but the backbone embeds {vocab_size}")  # fmt: skip
    for name in ("bos_id", "eos_id"):
        if not 0 <= getattr(config, name) < vocab_size:
            raise ValueError(f"{name}={getattr(config, name)} is outside the backbone's {vocab_size} token ids")
        own = getattr(tok, name)
        if own is not None and own != getattr(config, name):
            warnings.warn(f"taste: {name}={getattr(config, name)} is not the {name[:3]} token of llm_tokenizer "
                          f"{config.llm_tokenizer!r} ({own}): TASLM uses {getattr(config, name)} (set {name} to "
                          "the tokenizer's unless that is meant)", stacklevel=3)  # fmt: skip
    path = config.backbone_path
    ships_one = path and any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)
    if not ships_one or path == config.llm_tokenizer:
        return
    try:
        theirs = WordTokenizer(path)
    except (OSError, ValueError):  # (tokenizer files that transformers cannot read: nothing to compare with)
        return
    words = _PROBE.split()
    ours, own = [tok.word(w) for w in words], [theirs.word(w) for w in words]
    if ours != own:
        raise ValueError(f"llm_tokenizer {config.llm_tokenizer!r} does not tokenise like the backbone's own tokenizer "
                         f"in {path!r} (the words {words[:2]} give {ours[:2]} against {own[:2]}): set llm_tokenizer to "
                         f"{path!r}, and bos_id / eos_id to its ids")  # fmt: skip


def build_backbone(config) -> nn.Module:
    """The transformers causal LM of a :class:`taste.SpokenLMConfig`, wrapped by peft LoRA when ``lora_r > 0``."""
    try:  # packed batches rely on transformers masking each sequence from restarting position ids
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "TasteSpokenLM needs transformers >= 4.53.1 (packed sequences) and peft: pip install 'taste-kernels[lm]'"
        ) from e
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if config.backbone_path:
        if not os.path.isdir(config.backbone_path):
            raise FileNotFoundError(f"backbone_path {config.backbone_path!r} is not a directory")
        model = AutoModelForCausalLM.from_pretrained(config.backbone_path, attn_implementation="sdpa")
    else:
        model = LlamaForCausalLM(LlamaConfig(**config.backbone, attn_implementation="sdpa"))
    check_llm_tokenizer(config, model.config.vocab_size)
    if config.lora_r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules=_linear_names(model))  # fmt: skip
    with warnings.catch_warnings():  # peft reads an attribute that transformers 5 deprecates: nothing a caller can do
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, lora)
