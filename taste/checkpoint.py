"""The on-disk layout every model of this package uses: ``config.json`` (its config as JSON) and
``model.safetensors`` (its state dict: weights and buffers) in one directory; and the JSONL files that runs append
to and may be killed while writing (training logs, the ``taste encode`` journal)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def save_model(directory: str, config: dict, module: nn.Module, keep: set[str] | None = None) -> None:
    """Writes ``config`` and the state dict (only the keys in ``keep`` when given). Tensors that share storage
    (tied weights) are written once, under their first name."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    state, seen = {}, set()
    for k, v in module.state_dict().items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if (keep is not None and k not in keep) or (ptr is not None and ptr in seen):
            continue
        seen.add(ptr)
        state[k] = v.detach().contiguous().cpu()
    save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt", "model": type(module).__name__})


def read_tensors(path: str, select: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (a ``torch.save`` one for ``.bin``, ``.pt`` and ``.pth``) whose names
    ``select`` accepts (all by default), on the CPU. A file that exists but cannot be read (cut short by an
    interrupted download or copy, another format) raises a ValueError that names it."""
    import pickle

    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist or is not a file")
    try:
        if path.endswith((".bin", ".pt", ".pth")):
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return {k: v for k, v in loaded.items() if select is None or select(k)}
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if select is None or select(k)}
    except (SafetensorError, RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{path}: cannot read its tensors, is the file whole? ({e})") from e


def read_model(directory: str, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config dict, state dict)`` of a :func:`save_model` directory; ``kind`` names the model in errors."""
    directory = os.fspath(directory)  # (a Path: named as the string it is)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} is not a directory (expected a {kind}.save_pretrained directory)")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(directory, name)):
            inside = [os.path.join(directory, *sub) for sub in _RUN_LAYOUT]  # a training run's directory, say
            found = [d for d in inside if saved_model_kind(d) == kind]
            hint = f" (one is in {found[0]!r})" if found else ""
            raise FileNotFoundError(f"{directory!r} has no {name}: not a {kind}.save_pretrained directory{hint}")
    saved = saved_model_kind(directory)
    if saved in MODEL_KINDS and saved != kind:  # (else its config would fail as a KeyError or an unknown field)
        raise ValueError(f"{directory!r} holds a {saved}, not a {kind}")
    with open(os.path.join(directory, CONFIG_NAME)) as f:
        config = parse_json(f.read(), os.path.join(directory, CONFIG_NAME))
    return config, read_tensors(os.path.join(directory, WEIGHTS_NAME))


def load_saved_model(directory: str, kind: str, build: Callable[[dict], nn.Module]) -> nn.Module:
    """A :func:`save_model` directory's model: ``build(config dict)`` on the meta device (no weights initialised),
    then the file's tensors assigned, strictly."""
    raw, state = read_model(directory, kind)
    with torch.device("meta"):
        model = build(raw)
    model.load_state_dict(state, strict=True, assign=True)
    return model


# what save_model writes (a subclass: its own name)
MODEL_KINDS = ("TasteTokenizer", "UnitDecoder", "TasteSpokenLM", "VoiceGenerator")
# where training runs keep their models: final/, and a stage-1 run's tokenizer/ and decoder/ in it or a checkpoint
_RUN_LAYOUT = (("final",), ("final", "tokenizer"), ("final", "decoder"), ("tokenizer",), ("decoder",))


def saved_model_kind(directory: str) -> str | None:
    """The model class that :func:`save_model` recorded in ``directory``'s weights file (None: no such file, one
    without that record, or unreadable, which :func:`read_tensors` then reports)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.path.join(directory, WEIGHTS_NAME), framework="pt") as f:
            return (f.metadata() or {}).get("model")
    except (SafetensorError, OSError):
        return None


def meta_tensors(module: nn.Module) -> list[str]:
    """Names of the parameters and buffers of ``module`` still on the meta device (after building it there and
    loading a state dict with ``assign=True``, whatever the file did not hold)."""
    return [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]


def parse_json(text: str, where: str):
    """``json.loads`` whose error names the file (and line) it came from: ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON: {e}") from None


def iter_json_objects(path: str, what: str) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` for each non-blank line of a JSONL file, ``where`` being ``path:line`` for messages; a line
    that is not valid JSON, or not a JSON object (a ``what``), raises ValueError naming it."""
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            row = parse_json(line, where)
            if not isinstance(row, dict):
                raise ValueError(f"{where}: a {what} must be a JSON object, got {type(row).__name__}")
            yield where, row


def read_jsonl_records(path: str) -> list[dict]:
    """The records of a JSONL file, without any line that a writer killed mid-line left unparseable."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def open_journal(path: str, header: dict, ids: list, source: str, what: str, *,
                 defaults: dict | None = None) -> dict[int, dict]:  # fmt: skip
    """The records (index -> record, each with ``index`` and ``id``) that an interrupted run with ``header`` (its
    settings) kept in the JSONL journal ``path``, after rewriting the journal with this header and without a line
    the interruption left half-written; empty for a new journal. Raises where the journal is another run's (its
    header differs: named) or holds a row that ``ids`` (the rows of ``source``, by index) does not. ``defaults``:
    header keys that older journals lack, taken as these values. ``what`` names the run in messages."""
    records = read_jsonl_records(path) if os.path.exists(path) else []  # a header cut short leaves no records
    written = {**(defaults or {}), **records[0]} if records else {}
    if len(records) > 1 and written != header:  # (a journal of nothing done yet is simply started again)
        changed = sorted(k for k in {**header, **written} if written.get(k) != header.get(k))
        raise RuntimeError(f"{path} is the journal of another {what} (it differs in {', '.join(changed)}); delete it "
                           "to start over, or rerun the command that wrote it")  # fmt: skip
    done: dict[int, dict] = {}
    for record in records[1:]:
        i = record["index"]
        if not 0 <= i < len(ids) or ids[i] != record["id"]:
            raise RuntimeError(f"{path}: row {i} is {record['id']!r} there but not in {source}; delete it")
        done[i] = record
    write_jsonl_atomically(path, [header, *done.values()])
    return done


def write_jsonl_atomically(path: str, records: Iterable[dict]) -> None:
    """Writes ``records`` as JSONL to ``path`` through a temporary file and a rename: the file appears whole or not
    at all."""
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(path + ".tmp", path)
