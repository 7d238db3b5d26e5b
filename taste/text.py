"""Transcripts to packed, word-aligned ASR-side and LLM-side token ids (spec section 1.1 items 3-4).

Rule for words (one rule, for training and inference alike): the transcript is split on runs of whitespace
(``str.split()``, so double spaces never make empty words) and **every word, the first one included, is
tokenised on its own with one leading space** (``" " + word``), without special tokens. The official
inference processor does the same; its training dataset drops the first word's space (spec 7.1), which this
package does not reproduce. Punctuation stays attached to its word (spec 7.2).

Tokenisers, offline: ``"whisper"`` is Whisper large-v3's multilingual BPE (51866 ids) built through tiktoken
from the ``multilingual.tiktoken`` file that the openai-whisper pip package ships; ``"llama3"`` is Llama 3's
BPE (128256 ids) from the ``llama3/tokenizer.model`` that the llama-models pip package ships. Any other string
is a local Hugging Face tokenizer directory (``AutoTokenizer.from_pretrained(path)``).
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# Whisper's special tokens follow its 50257 byte-level BPE ranks in this order (openai-whisper's tokenizer).
WHISPER_LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt la mi "
    "ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be tg sd "
    "gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue"
).split()
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_BOS, LLAMA3_EOS = 128000, 128001


def _package_file(package: str, relative: str, pip_name: str) -> str:
    """Path of a data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the {pip_name} package is not installed; it ships {relative}, which this tokenizer is built from "
            f"(pip install {pip_name}, or pip install 'taste-kernels[text]')"
        )
    for root in spec.submodule_search_locations:
        path = os.path.join(root, relative)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{relative} not found inside the installed {pip_name} package")


def _read_ranks(path: str) -> dict[bytes, int]:
    with open(path, "rb") as f:
        return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}


_RANK_FILES = {
    "whisper": ("whisper", "assets/multilingual.tiktoken", "openai-whisper"),
    "llama3": ("llama_models", "llama3/tokenizer.model", "llama-models"),
}


@functools.cache
def bpe_ranks(name: str) -> dict[bytes, int]:
    """The byte-level BPE ranks (token bytes -> id) of the built-in tokenizer ``name`` (``"whisper"`` or
    ``"llama3"``), read from the file its pip package ships."""
    if name not in _RANK_FILES:
        raise ValueError(f"name must be one of {sorted(_RANK_FILES)}, got {name!r}")
    return _read_ranks(_package_file(*_RANK_FILES[name]))


@functools.cache
def whisper_encoding(num_languages: int = 100):
    """tiktoken ``Encoding`` of Whisper's multilingual tokenizer (large-v3: 100 languages, 51866 ids)."""
    import tiktoken

    ranks = bpe_ranks("whisper")
    names = ["<|endoftext|>", "<|startoftranscript|>"]
    names += [f"<|{lang}|>" for lang in WHISPER_LANGUAGES[:num_languages]]
    names += ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>"]
    names += ["<|notimestamps|>"] + [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    specials = {name: len(ranks) + i for i, name in enumerate(names)}
    return tiktoken.Encoding(
        name=f"whisper_multilingual_{num_languages}",
        explicit_n_vocab=len(ranks) + len(specials),
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=specials,
    )


@functools.cache
def llama3_encoding():
    """tiktoken ``Encoding`` of the Llama 3 tokenizer (128000 BPE ranks + 256 special tokens)."""
    import tiktoken

    ranks = bpe_ranks("llama3")
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>"]
    names += ["<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    names += ["<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
    names += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(names))]
    return tiktoken.Encoding(
        name="llama3",
        pat_str=_LLAMA3_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={name: len(ranks) + i for i, name in enumerate(names)},
    )


def _bpe(data: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Byte-level BPE of ``data`` with ``ranks``: the adjacent pair whose merge has the lowest rank merges first
    (the leftmost of equals), as tiktoken does within one pre-tokenised piece."""
    parts = [data[i : i + 1] for i in range(len(data))]
    while len(parts) > 1:
        rank, i = min((ranks.get(parts[i] + parts[i + 1], len(ranks)), i) for i in range(len(parts) - 1))
        if rank == len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """The printable characters that byte-level BPE vocabularies in Hugging Face's format (GPT-2, Llama 3, Qwen)
    write bytes as, back to the bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(name: str) -> list[bytes | None]:
    """What every id of tokenizer ``name`` stands for, as bytes; None for special tokens.

    Exact for ``"whisper"``, ``"llama3"`` and byte-level BPE directories (GPT-2, Llama 3, Qwen; tokens added to them
    as plain text are read as UTF-8); for SentencePiece vocabularies ``▁`` is read as a space and ``<0xNN>`` as that
    byte."""
    if name in _RANK_FILES:
        enc = whisper_encoding() if name == "whisper" else llama3_encoding()
        out: list[bytes | None] = [None] * enc.n_vocab
        for data, i in bpe_ranks(name).items():
            out[i] = data
        return out
    if not os.path.isdir(name):
        raise ValueError(f"tokenizer must be 'whisper', 'llama3' or a local Hugging Face tokenizer directory, got "
                         f"{name!r}")  # fmt: skip
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    special, pieces = set(tok.all_special_ids), tok.convert_ids_to_tokens(list(range(len(tok))))
    table = _byte_decoder()
    written = [i not in special and p is not None and all(c in table for c in p) for i, p in enumerate(pieces)]
    byte_level = sum(written) >= 0.99 * sum(i not in special for i in range(len(pieces)))  # (added tokens aside)
    out = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(None)
        elif byte_level and written[i]:
            out.append(bytes(table[c] for c in piece))
        elif byte_level:  # a token added to a byte-level vocabulary as plain text
            out.append(piece.encode())
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out


def token_pieces(target: str, source: str = "whisper") -> list[tuple[int, ...]]:
    """For every id of tokenizer ``target``, the ids of the built-in byte-level tokenizer ``source`` that spell the
    same bytes (byte-level BPE of them with ``source``'s ranks); ``()`` for ``target``'s special tokens. What
    :meth:`taste.TextQueryAggregator.remap_vocabulary` builds a new token embedding from."""
    ranks = bpe_ranks(source)
    return [() if data is None or not data else tuple(_bpe(data, ranks)) for data in token_bytes(target)]


class WordTokenizer:
    """Tokenises one word string at a time (no special tokens), with a cache: transcripts repeat words a lot."""

    def __init__(self, name: str):
        self.name = name
        if name in _RANK_FILES:
            enc = whisper_encoding() if name == "whisper" else llama3_encoding()
            self._encode, self._decode, self.vocab_size = enc.encode_ordinary, enc.decode, enc.n_vocab
            self.word_id_bound = len(bpe_ranks(name))  # words never tokenise into the special tokens after these
            self.bos_id = self.eos_id = None  # (not offered: Llama 3's end of text and end of turn are both in use)
        elif os.path.isdir(name):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(name)
            self._encode = functools.partial(tok.encode, add_special_tokens=False)
            self._decode, self.vocab_size = tok.decode, len(tok)
            self.word_id_bound = self.vocab_size
            self.bos_id, self.eos_id = tok.bos_token_id, tok.eos_token_id  # (None where it has none)
        else:
            raise ValueError(
                f"tokenizer must be 'whisper', 'llama3' or a local Hugging Face tokenizer directory, got {name!r}"
            )
        self._cache: dict[str, tuple[int, ...]] = {}

    def word(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            ids = tuple(self._encode(" " + word))
            if not ids:
                raise ValueError(f"tokenizer {self.name!r} gave no ids for the word {word!r}")
            self._cache[word] = ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode(list(ids))

    def pack(self, words: Sequence[Sequence[str]]) -> PackedText:
        """Word lists (one per text) -> their packed tokens, each word tokenised alone (:meth:`word`)."""
        return _pack([[self.word(w) for w in ws] for ws in words])


def split_words(text: str) -> list[str]:
    """Whitespace word split (runs of whitespace count once; leading and trailing whitespace ignored)."""
    return text.split()


@dataclass
class PackedText:
    """One side (ASR or LLM) of a tokenised batch, packed. All tensors are on the CPU.

    tokens ``(N,)`` int64; cu_seqlens ``(B + 1,)`` int32; word_ids ``(N,)`` int32 (0-based within each sequence);
    word_offsets ``(W_total + 1,)`` int32 over the packed rows; max_seqlen host int.
    """

    tokens: Tensor
    cu_seqlens: Tensor
    word_ids: Tensor
    word_offsets: Tensor
    max_seqlen: int


@dataclass
class TextBatch:
    """A tokenised batch: both sides share the words; ``word_cu_seqlens`` ``(B + 1,)`` int32 counts them."""

    asr: PackedText
    llm: PackedText | None
    word_cu_seqlens: Tensor
    words: list[list[str]]


def _pack(per_text: list[list[tuple[int, ...]]]) -> PackedText:
    tokens, word_ids, lengths, word_sizes = [], [], [], []
    for words in per_text:
        n = 0
        for w, ids in enumerate(words):
            tokens.extend(ids)
            word_ids.extend([w] * len(ids))
            word_sizes.append(len(ids))
            n += len(ids)
        lengths.append(n)
    zero = torch.zeros(1, dtype=torch.int32)
    cu = torch.cat([zero, torch.tensor(lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)])
    offsets = torch.cat([zero, torch.tensor(word_sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32)])
    return PackedText(
        tokens=torch.tensor(tokens, dtype=torch.long),
        cu_seqlens=cu,
        word_ids=torch.tensor(word_ids, dtype=torch.int32),
        word_offsets=offsets,
        max_seqlen=max(lengths, default=0),
    )


class DualTokenizer:
    """Per-word dual tokenisation (spec 1.1 item 4): ``texts -> TextBatch`` with the ASR side (the aggregator's
    queries) and, unless ``llm=None``, the LLM side, aligned by word ids.

    Args:
        asr: ``"whisper"`` (default), ``"llama3"`` or a local Hugging Face tokenizer directory.
        llm: same choices (default ``"llama3"``), or None to skip the LLM side.
        max_asr_tokens: longest allowed ASR sequence (the aggregator's ``max_positions`` minus its prefix: 443
            for Whisper's 448 positions); longer transcripts are refused.
    """

    def __init__(self, asr: str = "whisper", llm: str | None = "llama3", *, max_asr_tokens: int | None = 443):
        self.asr = WordTokenizer(asr)
        self.llm = WordTokenizer(llm) if llm is not None else None
        self.max_asr_tokens = max_asr_tokens

    def __call__(self, texts: Sequence[str]) -> TextBatch:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings (one transcript per utterance), got a single str")
        words = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
            split = split_words(text)
            if not split:
                raise ValueError(f"texts[{i}] has no words (empty or whitespace only): {text!r}")
            words.append(split)
        asr = self.asr.pack(words)
        if self.max_asr_tokens is not None and asr.max_seqlen > self.max_asr_tokens:
            lengths = asr.cu_seqlens.diff()
            i = int(lengths.argmax())
            raise ValueError(
                f"texts[{i}] has {int(lengths[i])} ASR tokens, more than max_asr_tokens={self.max_asr_tokens}"
            )
        llm = self.llm.pack(words) if self.llm is not None else None
        counts = torch.tensor([len(ws) for ws in words], dtype=torch.int32)
        word_cu = torch.cat([torch.zeros(1, dtype=torch.int32), counts.cumsum(0, dtype=torch.int32)])
        return TextBatch(asr=asr, llm=llm, word_cu_seqlens=word_cu, words=words)
