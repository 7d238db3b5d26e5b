"""Differential fuzzing of the alignment ops: the compiled kernels of ``taste._C`` against the references behind
their Python argument checks (``taste._fallback``), two implementations written apart, on random ragged batches.

Each case is one op called on a random batch (empty sequences, empty words, trailing dims of 0, 16-bit and 64-bit
values, non-contiguous inputs), half of the cases with one argument corrupted (an offset moved, a word id skipped, a
key out of range, a wrong dtype, shape or size). Both implementations must then agree: the same error message, or
results equal within the dtype's tolerance; neither may change its inputs. On a GPU the valid cases also run the
CUDA kernels against the CPU references; corrupted ones, in a fresh process, must be rejected as on the CPU with
``TASTE_STRICT_CHECKS=1`` and leave the device working without it.

The suite runs a few hundred cases. Longer campaigns, e.g. under AddressSanitizer (bench/RESULTS.md says how):

    python tests/test_fuzz_ops.py --cases 20000 [--seed 0] [--op segment_mean] [--device cuda]

(under compute-sanitizer on a GPU, ``--device cuda`` without TASTE_STRICT_CHECKS checks the unchecked kernels'
memory accesses). The Triton kernels' random-shape campaigns are ``tests/fuzz_kernels.py``; a test here keeps it
runnable.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import pytest
import torch

from taste import _fallback, ops

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5, torch.float64: 1e-12}


class Case:
    """A random batch and the call of one op on it; ``mutations`` says what was corrupted (empty: valid input)."""

    def __init__(self, op: str, seed: int, corrupt: bool):
        self.op, self.seed = op, seed
        self.rng = random.Random(f"{op}/{seed}")
        self.gen = torch.Generator().manual_seed(seed)
        self.mutations: list[str] = []
        self.lengths = [self.rng.choice((0, 1, 1, 2, 3, 5, 8)) for _ in range(self.rng.choice((0, 1, 1, 2, 3, 4, 6)))]
        self.n = sum(self.lengths)
        # rows of 67 and 80 values: the row copies' streaming path (>= 256 bytes), at unaligned and aligned rows
        self.trailing = self.rng.choice(((), (1,), (3,), (2, 3), (0,), (5,), (67,), (2, 40)))
        self.args = getattr(self, "_" + op)()
        if corrupt:
            self._corrupt()

    # ---- valid inputs ----
    def values(self, rows: int, dtype=None, trailing=None) -> torch.Tensor:
        dtype = dtype or self.rng.choice(FLOATS)
        shape = (rows, *(self.trailing if trailing is None else trailing))
        t = torch.randn(shape, generator=self.gen, dtype=torch.float64).to(dtype)
        if self.rng.random() < 0.3 and t.dim() >= 2:  # the same values in a non-contiguous view
            t = t.transpose(0, -1).contiguous().transpose(0, -1)
        return t

    def offsets(self, lengths) -> torch.Tensor:
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
        if self.rng.random() < 0.2:  # every other element of a larger tensor
            cu = torch.stack([cu, torch.full_like(cu, -7)], 1).reshape(-1)[::2]
        return cu

    def word_ids(self) -> torch.Tensor:
        ids = []
        for length in self.lengths:
            w = -1
            for t in range(length):
                w += 1 if t == 0 or self.rng.random() < 0.45 else 0
                ids.append(w)
        return torch.tensor(ids, dtype=self.rng.choice((torch.int32, torch.int64)))

    def word_lengths(self) -> list[int]:
        """Segments over the batch's rows, empty ones included."""
        lengths, left = [], self.n
        while left or self.rng.random() < 0.3:
            k = min(left, self.rng.choice((0, 1, 1, 2, 3)))
            lengths.append(k)
            left -= k
        return lengths

    def _pack(self):
        t = max(self.lengths, default=0) + self.rng.choice((0, 0, 1, 3))
        return dict(padded=self.values(len(self.lengths), trailing=(t, *self.trailing)),
                    lengths=torch.tensor(self.lengths, dtype=self.rng.choice((torch.int32, torch.int64))))  # fmt: skip

    def _pack_offsets(self):
        a = self._pack()
        return dict(padded=a["padded"], cu_seqlens=self.offsets(self.lengths), total=self.n)

    def _unpack(self):
        return dict(packed=self.values(self.n), cu_seqlens=self.offsets(self.lengths),
                    max_len=max(self.lengths, default=0) + self.rng.choice((0, 0, 2)),
                    pad_value=self.rng.choice((0.0, -1.0, 2.5)))  # fmt: skip

    def _word_offsets(self):
        return dict(word_ids=self.word_ids(), cu_seqlens=self.offsets(self.lengths))

    def _segment(self):
        return dict(x=self.values(self.n), offsets=self.offsets(self.word_lengths()))

    _segment_sum = _segment_mean = _segment_mean_broadcast = _segment

    def _segment_broadcast(self):
        offsets = self.offsets(self.word_lengths())
        args = dict(y=self.values(offsets.numel() - 1), offsets=offsets)
        if self.rng.random() < 0.5:
            args["num_rows"] = self.n
        return args

    def _segment_sum_by_key(self):
        k = self.rng.choice((0, 1, 3, 8))
        keys = torch.randint(-1, max(k, 0), (self.n,), generator=self.gen) if k else torch.full((self.n,), -1)
        return dict(values=self.values(self.n), keys=keys.to(self.rng.choice((torch.int32, torch.int64))), num_keys=k)

    def _prefix_layout(self):
        dtype = self.rng.choice((torch.int32, torch.int64))
        tokens = torch.randint(0, 100, (self.n,), generator=self.gen, dtype=dtype)
        prefix = torch.randint(100, 200, (self.rng.choice((0, 1, 4)),), generator=self.gen, dtype=dtype)
        return dict(tokens=tokens, cu_seqlens=self.offsets(self.lengths), prefix=prefix)

    def _delay_layout(self):
        return dict(word_ids=self.word_ids(), cu_seqlens=self.offsets(self.lengths), delay=self.rng.choice((0, 1, 2)))

    # ---- corruptions ----
    def _corrupt(self):
        index_args = [k for k, v in self.args.items() if isinstance(v, torch.Tensor) and not v.is_floating_point()]
        host_ints = [k for k, v in self.args.items() if isinstance(v, int) and not isinstance(v, bool)]
        name = self.rng.choice(index_args + host_ints + ["dtype"])
        a = self.args
        if name == "dtype":  # an index tensor of floats, or values of integers
            name = self.rng.choice(list(a))
            value = a[name]
            if not isinstance(value, torch.Tensor):
                return self._corrupt()
            a[name] = value.to(torch.int64 if value.is_floating_point() else torch.float32)
            self.mutations.append(f"{name} as {a[name].dtype}")
            return
        if name in host_ints:
            a[name] = a[name] + self.rng.choice((-2, -1, 1, 2))
            self.mutations.append(f"{name} = {a[name]}")
            return
        t = a[name].clone()
        kind = self.rng.choice(("entry", "entry", "entry", "drop", "extra", "2d", "empty"))
        if kind == "entry" and t.numel():
            i = self.rng.randrange(t.numel())
            t[i] = self.rng.randint(-3, self.n + 3)
            self.mutations.append(f"{name}[{i}] = {int(t[i])}")
        elif kind == "drop" and t.numel():
            t = t[:-1] if self.rng.random() < 0.5 else t[1:]
            self.mutations.append(f"{name} one entry short")
        elif kind == "extra":
            t = torch.cat([t, t[-1:] if t.numel() else t.new_zeros(1)])
            self.mutations.append(f"{name} one entry long")
        elif kind == "2d" and t.numel():
            t = t.view(1, -1)
            self.mutations.append(f"{name} 2-D")
        else:
            t = t[:0]
            self.mutations.append(f"{name} empty")
        a[name] = t

    def call(self, impl, device="cpu"):
        """(error message, None) or (None, outputs as a tuple); the inputs must come back unchanged. An exception other
        than RuntimeError comes back as its type's name and message."""
        args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.args.items()}
        before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
        saved, ops._impl = ops._impl, impl
        try:
            out = getattr(ops, self.op)(**args)
        except Exception as e:  # (only a RuntimeError of the op's own checks passes compare)
            message = str(e).split("\n")[0]
            return (message if isinstance(e, RuntimeError) else f"{type(e).__name__}: {message}"), None
        finally:
            ops._impl = saved
            for k, v in before.items():
                assert torch.equal(args[k], v), f"{self} changed its input {k}"
        return None, tuple(out) if isinstance(out, tuple) else (out,)

    def __repr__(self):
        shapes = {k: (tuple(v.shape), str(v.dtype)[6:]) if isinstance(v, torch.Tensor) else v for k, v in
                  self.args.items()}  # fmt: skip
        return f"{self.op}(seed={self.seed}, lengths={self.lengths}, {shapes}, corrupted: {self.mutations or 'no'})"


def compare(case: Case, compiled=None, device: str = "cpu") -> str:
    """Runs the case on the compiled ops (on ``device``) and on the fallback (on the CPU); returns "error" or "ok"
    and raises AssertionError where they disagree."""
    compiled = torch.ops.taste if compiled is None else compiled
    err_c, out_c = case.call(compiled, device)
    err_f, out_f = case.call(_fallback)
    assert err_c == err_f, f"{case}:\n  compiled: {err_c!r}\n  fallback: {err_f!r}"
    if err_c is not None:
        assert err_c.startswith("taste: "), f"{case}: an error that is not the op's own check: {err_c!r}"
        return "error"
    assert len(out_c) == len(out_f), case
    for i, (c, f) in enumerate(zip(out_c, out_f)):
        where = f"{case}: output {i}"
        assert c.dtype == f.dtype and c.shape == f.shape, f"{where}: {c.dtype} {c.shape} vs {f.dtype} {f.shape}"
        tol = TOLERANCE.get(c.dtype, 0)
        torch.testing.assert_close(c.cpu(), f, atol=tol, rtol=tol, equal_nan=True, msg=lambda m, w=where: f"{w}: {m}")
    return "ok"


OPS = ("pack", "pack_offsets", "unpack", "word_offsets", "segment_sum", "segment_mean", "segment_mean_broadcast",
       "segment_broadcast", "segment_sum_by_key", "prefix_layout", "delay_layout")  # fmt: skip
CASES_PER_OP = 200


@pytest.mark.skipif(not ops.HAS_EXTENSION, reason="compares the compiled extension with the fallback")
@pytest.mark.parametrize("op", OPS)
def test_compiled_ops_agree_with_the_fallback(op):
    seen = {"ok": 0, "error": 0}
    for seed in range(CASES_PER_OP):
        seen[compare(Case(op, seed, corrupt=seed % 2 == 1))] += 1
    assert seen["ok"] >= CASES_PER_OP // 2 and seen["error"] >= CASES_PER_OP // 8, seen  # both sides were fuzzed


def survive(case: Case, device: str) -> str:
    """Corrupted input on a device whose kernels do not check values (``TASTE_STRICT_CHECKS`` unset): the op may
    raise a RuntimeError or return anything, but must leave the device working (no access outside its tensors)."""
    err, _ = case.call(torch.ops.taste, device)
    torch.cuda.synchronize(device)  # an illegal memory access surfaces here, and breaks every later call
    assert err is None or not err.startswith(("AssertionError", "IndexError", "ValueError", "TypeError")), (
        f"{case}: {err}"
    )
    return "error" if err else "ok"


CUDA_TESTS = pytest.mark.skipif(not torch.cuda.is_available() or not ops.HAS_EXTENSION, reason="needs a CUDA GPU")


@pytest.mark.cuda
@CUDA_TESTS
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_agree_with_the_cpu_references(op):
    for seed in range(CASES_PER_OP):  # valid input only: CUDA kernels check values only where they sync
        compare(Case(op, seed, corrupt=False), device="cuda")


@pytest.mark.cuda
@CUDA_TESTS
@pytest.mark.parametrize("strict", [True, False], ids=["strict checks", "unchecked"])
def test_cuda_kernels_on_corrupted_input(strict):
    """In a fresh process each (the checks' switch is read once; a broken device would break the other tests):
    with TASTE_STRICT_CHECKS=1 the CUDA ops reject exactly what the CPU ones do, with the same messages; without
    it they must survive whatever they are given."""
    import subprocess

    env = dict(os.environ, TASTE_STRICT_CHECKS="1" if strict else "0")
    run = subprocess.run([sys.executable, __file__, "--device", "cuda", "--cases", "100"], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


@pytest.mark.parametrize("kernel", ["attention", "rvq"])
def test_kernel_campaigns_run(kernel):
    """tests/fuzz_kernels.py, a tool, stays runnable: three random cases of each Triton kernel (the interpreter
    without a GPU)."""
    pytest.importorskip("triton")
    import subprocess

    device = "cuda" if torch.cuda.is_available() else "cpu"
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_kernels.py")
    run = subprocess.run([sys.executable, script, kernel, "--cases", "3", "--device", device], capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0 and "3 cases" in run.stdout, run.stdout[-4000:] + run.stderr[-4000:]


def main() -> int:
    ap = argparse.ArgumentParser(description="Differential fuzzing of taste's alignment ops (see the docstring).")
    ap.add_argument("--cases", type=int, default=2000, help="cases per op")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--op", choices=OPS, action="append", help="only these ops (repeatable)")
    ap.add_argument("--device", default="cpu", help="device of the compiled ops (the fallback runs on the CPU)")
    args = ap.parse_args()
    # On a GPU the kernels check values only with TASTE_STRICT_CHECKS=1; without it corrupted cases must only survive.
    strict = args.device == "cpu" or os.environ.get("TASTE_STRICT_CHECKS", "") not in ("", "0")
    failures = 0
    for op in args.op or OPS:
        seen = {"ok": 0, "error": 0}
        for seed in range(args.seed, args.seed + args.cases):
            case = Case(op, seed, corrupt=seed % 2 == 1)
            try:
                if strict or not case.mutations:
                    seen[compare(case, device=args.device)] += 1
                else:
                    seen[survive(case, args.device)] += 1
            except AssertionError as e:
                failures += 1
                print(f"FAIL {e}", flush=True)
        print(f"{op}: {seen['ok']} results, {seen['error']} errors", flush=True)
    print(f"{failures} disagreements")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
