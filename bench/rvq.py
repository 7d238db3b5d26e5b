"""Benchmark of the residual vector quantizer: vector-quantize-pytorch's ResidualVQ (what the official TASTE code
copied), a plain cdist + argmin loop, and ours (taste.ResidualVQ on the fused Triton kernels on CUDA).

    python bench/rvq.py [--device cpu|cuda] [--rows 6400] [--json out.json]

Problem: N rows (64 utterances x 100 words), dim 1280 -> 256, 4 x 512 codes, float32 (the RVQ's precision).
Cases: encode in eval (projections included; ours also as codes only, without the (N, 1280) output, and on a GPU
in fast mode), its parts (the search on given codes; the two projections alone), forward + backward in training
(EMA update included; the loop provider has no EMA), decode (get_output_from_indices).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import CdistLoop  # noqa: E402
from common import measure, no_grad_call, parse, parser, print_tuning, report, tuning_summary  # noqa: E402

import taste  # noqa: E402

try:
    from vector_quantize_pytorch import ResidualVQ as VQPResidualVQ
except ImportError:
    VQPResidualVQ = None

KW = dict(dim=1280, codebook_dim=256, num_quantizers=4, codebook_size=512, decay=0.99)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rows", type=int, default=6400, help="rows (words) to quantize (default 6400: 64 x 100)")
    p.add_argument("--fast", action="store_true", help="ours in fast mode (tf32 products on CUDA)")
    args = parse(p)
    dev, n = args.device, args.rows
    torch.manual_seed(0)
    ours = taste.ResidualVQ(**KW, kmeans_init=False, quantize_dropout=False, fast=args.fast).to(dev)
    models = {}
    if VQPResidualVQ is not None:
        ref = VQPResidualVQ(**KW, kmeans_init=False, quantize_dropout=False, rotation_trick=False).to(dev)
        ours.load_state_dict(ref.state_dict())
        models["vector-quantize-pytorch"] = (ref, lambda m, x: m(x[None]))
    else:
        print("vector-quantize-pytorch is not installed: its provider is skipped", file=sys.stderr)
    models["cdist + argmin loop"] = (CdistLoop(ours), lambda m, x: m(x))
    models["ours (taste.ResidualVQ)"] = (ours, lambda m, x: m(x))
    x = torch.randn(n, KW["dim"], device=dev)
    xg = x.clone().requires_grad_()

    def eval_encode(model, call):
        def run():
            model.eval()
            with torch.no_grad():
                return call(model, x)

        return run

    def train_step(model, call):
        def run():
            model.train()
            q, _, loss = call(model, xg)
            (q.float().square().mean() + loss.sum()).backward()

        return run

    with torch.no_grad():
        ours.eval()
        indices = ours(x)[1]

    def decode(model, call):
        idx = indices[None] if model is models.get("vector-quantize-pytorch", (None,))[0] else indices

        def run():
            with torch.no_grad():
                return model.get_output_from_indices(idx)

        return run

    rows = []
    label = f"N={n} 1280->256 4x512"
    encoders = {k: eval_encode(*v) for k, v in models.items()}
    if dev == "cuda" and not args.fast:  # the fast mode beside the exact one (on the CPU they are the same)
        fast = taste.ResidualVQ(**KW, kmeans_init=False, quantize_dropout=False, fast=True).to(dev)
        fast.load_state_dict(ours.state_dict())
        encoders["ours, fast mode (tf32)"] = eval_encode(fast, lambda m, x: m(x))
        with torch.no_grad():
            agree = (fast.eval()(x)[1] == indices).float().mean().item()
        print(f"fast-mode indices equal to the exact mode's: {100 * agree:.2f}%")
    encoders["ours, codes only (.encode)"] = lambda: no_grad_call(ours.encode, x)
    if "ours, fast mode (tf32)" in encoders:  # what a tokenizer in fast mode runs
        encoders["ours, codes only, fast mode"] = lambda: no_grad_call(fast.encode, x)
    rows += measure(f"encode (eval) {label}", encoders, dev, args.reps)
    # Where the encode time goes: the search on given codes z, and the two cuBLAS projections alone.
    with torch.no_grad():
        z = ours.project_in(x).float()
    loop = models["cdist + argmin loop"][0]
    search = {
        "cdist + argmin loop": lambda: no_grad_call(loop.search, z),
        "ours (ops.rvq_encode)": lambda: no_grad_call(taste.ops.rvq_encode, z, ours.embed),
    }
    if dev == "cuda":
        search["ours, fast mode (tf32)"] = lambda: no_grad_call(lambda: taste.ops.rvq_encode(z, ours.embed, fast=True))
    rows += measure(f"search only (z given) N={n} 4x512x256", search, dev, args.reps)
    projections = {"project_in + project_out": lambda: no_grad_call(lambda: ours.project_out(ours.project_in(x)))}
    rows += measure(f"projections only N={n} 1280->256->1280", projections, dev, args.reps)
    rows += measure(f"train fwd+bwd {label}", {k: train_step(*v) for k, v in models.items()}, dev, args.reps)
    rows += measure(f"decode {label}", {k: decode(*v) for k, v in models.items()}, dev, args.reps)
    mode = "fast" if args.fast else "exact"
    extra = {}
    if dev == "cuda":
        from taste.kernels.rvq import tuned_tiles, tuned_timings

        extra["autotune"] = tuning_summary("encoder", tuned_tiles(), tuned_timings())
    report(f"bench/rvq.py on {dev}, float32, ours in {mode} mode", rows, dev, args.json, extra=extra)
    print_tuning(extra.get("autotune", {}))


if __name__ == "__main__":
    main()
