"""Argument checks the modules share, worded in their callers' terms."""

from __future__ import annotations

import dataclasses
import numbers

import torch
from torch import Tensor


def check_id_range(ids: Tensor, size: int, name: str, size_name: str = "vocab_size") -> None:
    """Raises unless every id lies in ``[0, size)`` (what an embedding reports as "index out of range in self").

    Reads the values back, so only on CPU tensors and outside ``torch.compile`` (elsewhere it checks nothing: on a GPU
    the read would sync). Floating-point ids are left to the dtype checks of whatever takes them.
    """
    if ids.device.type != "cpu" or torch.compiler.is_compiling():
        return
    if ids.numel() and not ids.is_floating_point() and not ids.is_complex():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= size:
            raise ValueError(f"{name} must lie in [0, {size_name}={size}), got ids in [{lo}, {hi}]")


# annotation (its name before any "[") -> the Python types a value of it may have (a bool is never an int or float)
_ANNOTATED = {"int": (numbers.Integral,), "float": (numbers.Real,), "bool": (bool,), "str": (str,), "dict": (dict,),
              "tuple": (tuple, list)}  # fmt: skip


def check_field_types(config) -> None:
    """Raises a TypeError naming the field unless each field of a config dataclass holds its annotated type.

    Configs come from JSON files as often as from code, and ``"steps": "100"`` is as easy to write as ``100``. Any
    integer does for an int and any real number for a float; a bool does for neither. Annotations other than
    ``int``, ``float``, ``bool``, ``str``, ``dict``, ``tuple[...]`` (a list does too) and their ``| None`` are not
    checked.
    """
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
        kinds = [k.strip().split("[")[0] for k in annotation.split("|")]
        if value is None and "None" in kinds:
            continue
        if any(k not in _ANNOTATED and k != "None" for k in kinds):
            continue  # (a type this check does not know, e.g. a nested config)
        allowed = tuple(t for k in kinds if k != "None" for t in _ANNOTATED[k])
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise TypeError(f"{field.name} must be {field.type}, got {value!r} ({type(value).__name__})")


def check_at_least(config, minimum, *names: str) -> None:
    """Raises a ValueError naming the first of ``names`` whose value is below ``minimum``."""
    for name in names:
        if getattr(config, name) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {getattr(config, name)}")


def check_positive_int(value, name: str, what: str = "") -> None:
    """Raises a ValueError naming ``name`` unless ``value`` is an int >= 1 (a bool is not); ``what`` says what it
    counts."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int{what}, got {value!r}")
