"""The ``taste`` command line (``taste --help`` lists every subcommand; ``taste SUBCOMMAND --help`` its options).

taste corpus OUT_DIR --num N          speak built-in sentences with espeak-ng -> wavs + manifest.jsonl
taste units MANIFEST --k 256          50 Hz k-means units of log-mel frames -> MANIFEST.units.jsonl
taste init-tokenizer OUT_DIR          a seed TasteTokenizer (random preset, or --whisper LOCAL_DIR)
taste encode MANIFEST --model DIR -o codes.jsonl    batched TASTE codes, one row per word
taste reconstruct MANIFEST --model DIR --voice DIR -o OUT   speech -> TASTE -> units -> speech

The subcommands live by topic: :mod:`taste.cli.data` (corpus, units, codes, transcripts, S3 units, speaker
vectors), :mod:`taste.cli.tokenizer` (stage 1), :mod:`taste.cli.lm` (TASLM), :mod:`taste.cli.release` (the
released checkpoint's pieces); each registers its parsers with ``register(sub)``.
"""

from __future__ import annotations

import argparse
import sys

from taste.cli import data, lm, release, tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="taste", description="TASTE speech tokenization and the TASLM spoken language model"
    )
    sub = p.add_subparsers(dest="command", required=True)
    for module in (data, tokenizer, lm, release):
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from taste.trainer import TrainingInterrupted

    try:
        args.func(args)
    except TrainingInterrupted as e:  # pre-empted: the checkpoint is saved; exit as the signal would have
        print(f"taste {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except (RuntimeError, ValueError, FloatingPointError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"taste {args.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Under torchrun, the training commands join a process group (``taste.trainer.setup_distributed``); leaving it
    before the interpreter exits keeps the backend's threads from being torn down mid-exit (gloo can abort then)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
