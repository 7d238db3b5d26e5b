"""taste-kernels: TASTE / TASLM with fused kernels."""

import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _source_checkout_kernels() -> None:
    """In a source checkout `kernels/` sits next to `taste/` instead of inside it (setup.py installs it as
    taste.kernels): register it under that name so that the same imports work from the repository."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isdir(_os.path.join(here, "kernels")) or "taste.kernels" in _sys.modules:
        return
    init = _os.path.join(_os.path.dirname(here), "kernels", "__init__.py")
    if not _os.path.isfile(init):
        return
    spec = _importlib_util.spec_from_file_location(
        "taste.kernels", init, submodule_search_locations=[_os.path.dirname(init)]
    )
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["taste.kernels"] = module
    spec.loader.exec_module(module)


_source_checkout_kernels()

from taste import ops  # noqa: E402
from taste.aggregator import AggregatorConfig, TextQueryAggregator  # noqa: E402
from taste.generate import GenerationConfig, GenerationOutput  # noqa: E402
from taste.official import load_official  # noqa: E402
from taste.ops import HAS_EXTENSION, DelayLayout, PrefixLayout  # noqa: E402
from taste.rvq import ResidualVQ  # noqa: E402
from taste.s3_tokenizer import S3Tokenizer  # noqa: E402
from taste.speaker import SpeakerEncoder  # noqa: E402
from taste.spoken_lm import SpokenLMConfig, SpokenLMOutput, SpokenLMScores, TasteSpokenLM  # noqa: E402
from taste.tokenizer import QuantizerConfig, TasteConfig, TasteTokenizer, TokenizerOutput  # noqa: E402
from taste.unit_decoder import UnitDecoder, UnitDecoderConfig, UnitDecoderOutput  # noqa: E402
from taste.voice import VoiceGenerator, VoiceGeneratorConfig  # noqa: E402

__all__ = [
    "ops",
    "HAS_EXTENSION",
    "DelayLayout",
    "PrefixLayout",
    "AggregatorConfig",
    "TextQueryAggregator",
    "ResidualVQ",
    "QuantizerConfig",
    "TasteConfig",
    "TasteTokenizer",
    "TokenizerOutput",
    "UnitDecoder",
    "UnitDecoderConfig",
    "UnitDecoderOutput",
    "VoiceGenerator",
    "VoiceGeneratorConfig",
    "SpeakerEncoder",
    "S3Tokenizer",
    "TasteSpokenLM",
    "SpokenLMConfig",
    "SpokenLMOutput",
    "SpokenLMScores",
    "GenerationConfig",
    "GenerationOutput",
    "load_official",
]
__version__ = "0.1.0"
