"""Random-shape campaigns for the Triton kernels, through the checks of their tests: the attention forward, its
log-sum-exp and deterministic backward (``test_text_query_attention._triton_check``) and the RVQ encoder and decoder
(``test_rvq._kernel_check``), on ragged batches and sizes the tests' fixed cases do not name.

    python tests/fuzz_kernels.py attention --cases 600 [--seed 0] [--device cuda]
    python tests/fuzz_kernels.py rvq --cases 800

Without a GPU the kernels run in Triton's interpreter (set here), in float32 and float16 (its bfloat16 ``tl.dot``
returns garbage, STYLE.md); on a GPU bfloat16 too. Softmax scales stay within 2x of ``D ** -0.5``, 0 and negative:
at scores of |60| (scale 1.7, D 128) the float32 forward errs by ~7e-6 in the interpreter, as much as the same
float32 arithmetic in NumPy (8e-6; the interpreter runs its dots there), but the tests' bound is twice PyTorch's own
float32 error (8.5e-7 there: its CPU GEMM sums more accurately) + 2e-6. Prints each failing case (its seed
reproduces it); exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch


def attention_case(rng: random.Random, device: str) -> dict:
    batch = rng.choice((1, 1, 2, 3, 5))
    lq = [rng.choice((0, 1, 2, 5, 16, 17, 31, 64, 65, 129)) for _ in range(batch)]
    lk = [rng.choice((0, 1, 3, 16, 33, 64, 100, 200)) for _ in range(batch)]
    lq[0] = max(lq[0], 1)  # (max_seqlen_q 0 is the tests' own case)
    dim = rng.choice((32, 64, 64, 128))
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if device == "cuda" else ())
    return dict(lq=lq, lk=lk, dim=dim, dtype=rng.choice(dtypes), causal=rng.random() < 0.4,
                splits=rng.choice((None, 1, 2, 3, 5)),
                scale=rng.choice((None, None, 2 * dim**-0.5, 0.5 * dim**-0.5, 0.0, -(dim**-0.5))))  # fmt: skip


def rvq_case(rng: random.Random, device: str) -> dict:
    fast = rng.random() < 0.3
    dtype = rng.choice((torch.float32, torch.float32, torch.float16, torch.bfloat16))
    if fast and dtype == torch.bfloat16 and device != "cuda":
        dtype = torch.float16  # the fast mode multiplies 16-bit rows in their dtype: no bf16 dot in the interpreter
    return dict(n=rng.choice((1, 2, 3, 31, 33, 64, 65, 100)), d=rng.choice((1, 3, 8, 16, 17, 40, 64, 100, 128, 256)),
                k=rng.choice((2, 3, 16, 17, 63, 64, 65, 100, 130)), fast=fast, dtype=dtype)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel", choices=("attention", "rvq"))
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--device", default="cpu", help="cpu: Triton's interpreter; cuda: the GPU")
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import conftest  # noqa: F401  (the interpreter patches the tests rely on)

    if args.kernel == "attention":
        from test_text_query_attention import _triton_check

        def check(c, gen):
            _triton_check(args.device, c["lq"], c["lk"], c["dim"], c["dtype"], c["causal"], c["splits"], gen,
                          scale=c["scale"])  # fmt: skip

        make = attention_case
    else:
        from test_rvq import _kernel_check

        def check(c, gen):
            _kernel_check(args.device, c["n"], c["d"], c["k"], gen, fast=c["fast"], dtype=c["dtype"])

        make = rvq_case
    failures, start = 0, time.time()
    for seed in range(args.seed, args.seed + args.cases):
        case = make(random.Random(f"{args.kernel}/{seed}"), args.device)
        try:
            check(case, torch.Generator().manual_seed(seed))
        except Exception as e:  # noqa: BLE001  (any failure is reported with its case)
            failures += 1
            print(f"FAIL seed={seed} {case}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    print(f"{args.kernel}: {args.cases} cases on {args.device}, {failures} failed, {time.time() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
