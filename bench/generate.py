"""Benchmark of TASLM generation: tokens per second of ours (batched, KV cache, the state machine in tensors)
against the official algorithm (batch 1, the whole sequence re-run every step, lm_head and the code head on every
position, a host read per step), on the same random weights, greedy, from the same speech prompt.

    python bench/generate.py [--device cpu|cuda] [--preset cpu_100m|llama_3_2_1b] [--words 16 32 64 128]
                             [--batch 16] [--json out.json]

Every case generates up to N text tokens (``extra_words`` = N, so no word limit stops earlier) after a 12-word
prompt with TASTE codes; both algorithms must produce identical tokens and codes (checked). Ours runs at batch 1
(the official algorithm's only size) and at ``--batch`` sequences (the same prompt repeated). ``cpu_100m``: a Llama
of ~90M parameters (d 512, 8 layers, Llama-3 vocabulary), default on the CPU; ``llama_3_2_1b`` (random weights,
bf16) on a GPU. LoRA r 64 unmerged on both, as the released model runs.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from baselines import official_generate  # noqa: E402
from common import Row, parse, parser, peak_mb, profile_row, report, time_providers  # noqa: E402

from taste.continuation import prompt_batch  # noqa: E402
from taste.generate import GenerationConfig  # noqa: E402
from taste.spoken_lm import SpokenLMConfig, TasteSpokenLM  # noqa: E402

PROMPT = "the quick brown fox jumps over the lazy dog while the cat sleeps"


def build(preset: str, device: str) -> TasteSpokenLM:
    torch.manual_seed(0)
    if preset == "cpu_100m":
        backbone = SpokenLMConfig().backbone | dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                                    num_attention_heads=8, num_key_value_heads=2)  # fmt: skip
        config = SpokenLMConfig(backbone=backbone)
    else:
        config = SpokenLMConfig.llama_3_2_1b()
    with torch.device(device):  # built where it runs: a 1B model initialised on the CPU costs a minute
        model = TasteSpokenLM(config=config).eval()
    with torch.no_grad():  # nonzero adapters and codebooks, so that every part computes something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
        model.vq.embed.normal_()
    model.to(device)
    if device == "cuda":
        model.language_model.to(torch.bfloat16)
    return model


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading rows (or entries) two sequences share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = (a[:n] != b[:n]).reshape(n, -1).any(1).nonzero()
    return int(differ[0]) if len(differ) else n


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--preset", choices=("cpu_100m", "llama_3_2_1b"), default=None)
    p.add_argument("--words", type=int, nargs="+", default=None, help="default: 16 32 64 128 (cpu: 16 64)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--compile", action="store_true", help="ours with the compiled step")
    args = parse(p)
    dev = args.device
    preset = args.preset or ("cpu_100m" if dev == "cpu" else "llama_3_2_1b")
    lengths = args.words or ([16, 64] if dev == "cpu" else [16, 32, 64, 128])
    model = build(preset, dev)
    params = sum(p.numel() for p in model.language_model.parameters()) / 1e6
    words = PROMPT.split()
    tokens, cu, word_ids = prompt_batch([words], model.config.llm_tokenizer)
    codes = torch.randint(0, model.config.codebook_size, (len(words), model.config.num_quantizers),
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    tokens, cu, word_ids, codes = (x.to(dev) for x in (tokens, cu, word_ids, codes))
    b = args.batch
    rep = (tokens.repeat(b), torch.arange(b + 1, dtype=torch.int32, device=dev) * tokens.numel(),
           word_ids.repeat(b), codes.repeat(b, 1))  # fmt: skip
    rows = []
    for n in lengths:
        cfg = GenerationConfig(extra_words=n, text_top_p=0.0, max_new_tokens=n)
        holder: dict = {}

        def official(n=n, holder=holder):
            holder["official"] = official_generate(model, tokens, word_ids, codes, extra_words=n, max_new_tokens=n)

        def ours1(cfg=cfg, holder=holder):
            holder["ours"] = model.generate(tokens, cu, word_ids, codes, config=cfg, compile=args.compile)

        def ours_b(cfg=cfg, holder=holder):
            holder["batch"] = model.generate(*rep, config=cfg, compile=args.compile)

        fns = {"official algorithm (B=1, no cache)": official, "ours B=1 (KV cache)": ours1,
               f"ours B={b} (KV cache)": ours_b}  # fmt: skip
        times = time_providers(list(fns.values()), dev, args.reps or (3 if dev == "cpu" else 5), budget_s=0)
        ot, oc = holder["official"]
        out = holder["ours"]
        k = int(out.num_words[0])
        ours_tokens, ours_codes = out.tokens[0][out.tokens[0] >= 0].cpu(), out.codes[0, :k].cpu()
        same = torch.equal(ours_tokens, ot.cpu()) and torch.equal(ours_codes, oc.cpu())
        agree = dict(tokens=common_prefix(ours_tokens, ot.cpu()), of_tokens=len(ot),
                     words=common_prefix(ours_codes, oc.cpu()), of_words=len(oc))  # fmt: skip
        gen = int((out.tokens[0] >= 0).sum())
        base_tps = gen / (times[0] * 1e-3)
        for (name, fn), ms in zip(fns.items(), times):
            seqs = b if name.startswith(f"ours B={b}") else 1
            tps = seqs * gen / (ms * 1e-3)
            row = Row(f"{n} tokens ({k} words)", name, ms, peak_mb(fn, dev), ratio=tps / base_tps)
            row.extra = {"tokens_per_s": tps, "sequences": seqs, "identical": same, "agree": agree}
            rows.append(row)
            print(f"  {row.case} | {name}: {ms:.1f} ms, {tps:.1f} tokens/s", flush=True)
            if common.PROFILE and name.startswith("ours"):
                profile_row(row, fn, dev)
        print(f"  identical tokens and codes (official vs ours B=1): {same}"
              + ("" if same else f"; they agree for the first {agree['tokens']} of {agree['of_tokens']} tokens and "
                 f"the codes of the first {agree['words']} of {agree['of_words']} words"))  # fmt: skip
    report(f"bench/generate.py on {dev}, {preset} ({params:.0f}M backbone + LoRA), greedy; speed-up = tokens/s "
           f"over the official algorithm", rows, dev, args.json)  # fmt: skip
    for n in lengths:
        sel = [r for r in rows if r.case.startswith(f"{n} tokens")]
        print(
            f"{n:>4} tokens: ours B=1 {sel[1].ratio:.1f}x, ours B={b} {sel[2].ratio:.1f}x the official tokens/s; "
            f"B={b} / B=1 throughput {sel[2].extra['tokens_per_s'] / sel[1].extra['tokens_per_s']:.1f}x"
        )


if __name__ == "__main__":
    main()
