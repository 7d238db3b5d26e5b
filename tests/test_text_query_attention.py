"""text_query_attention: the custom op (reference on CPU, Triton on CUDA) and the Triton kernels themselves
(in Triton's interpreter on CPU, natively on a GPU) against a per-sequence float64 softmax attention."""

import pytest
import torch
from conftest import (
    DEVICES,
    HAS_CUDA,
    make_cu,
    needs_cuda,
    on_triton_interpreter,
    refuse_tiles,
    skip_unless_launches_go_through_run,
)

from taste import ops, reference

try:
    from taste.kernels import attention
except ImportError:  # no Triton: the kernel tests skip
    attention = None

# (query lengths, key lengths): B = 1, a length-1 query, an empty query sequence, empty keys, odd sizes.
CROSS = [
    ([1], [7]),
    ([5, 1, 0, 17], [40, 3, 7, 17]),
    ([3, 2], [0, 5]),
    ([33, 64, 9], [150, 129, 1]),
    ([2, 3], [0, 0]),
    ([0, 0], [4, 2]),
]  # no key at all (max_seqlen_k 0), no query at all
SELF = [([1], [1]), ([5, 1, 0, 17], [5, 1, 0, 17]), ([3, 8], [6, 8])]  # the last: Lk > Lq (bottom-right)


def naive(q, k, v, cu_q, cu_k, causal, scale, dtype=torch.float64):
    """Per-sequence softmax(q k^T) v computed in ``dtype`` (float64: the truth); rows without keys give 0."""
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    for b in range(cu_q.numel() - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        s = torch.einsum("qhd,khd->hqk", q[qs:qe].to(dtype), k[ks:ke].to(dtype)) * scale
        if causal:
            i = torch.arange(qe - qs, device=q.device)[:, None]
            j = torch.arange(ke - ks, device=q.device)[None]
            s = s.masked_fill(j > i + (ke - ks) - (qe - qs), float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        out[qs:qe] = torch.einsum("hqk,khd->qhd", p, v[ks:ke].to(dtype))
    return out


def max_abs(t) -> float:
    """Largest absolute value, 0 for an empty tensor (a batch without queries or keys)."""
    return t.abs().max().item() if t.numel() else 0.0


def make(lq, lk, heads, dim, dtype, device, gen):
    q, k, v = (torch.randn(sum(n), heads, dim, generator=gen).to(device, dtype) for n in (lq, lk, lk))
    return q, k, v, make_cu(lq, device), make_cu(lk, device)


def max_error_allowed(out, ref, q, k, v, cu_q, cu_k, causal, scale):
    """flash-attention's rule: at most twice the error of the same computation in PyTorch at the same dtype, or of
    the truth rounded to that dtype where that is larger. The rounding alone understates float32 arithmetic where
    scores are large (|s| ~ 20 at twice the default scale): there PyTorch's own float32 run errs by ~2.8e-6, as the
    kernels do, against 1.2e-7 for the rounding (tests/fuzz_kernels.py found it)."""
    rounded = naive(q, k, v, cu_q, cu_k, causal, scale).to(q.dtype)
    same_dtype = naive(q, k, v, cu_q, cu_k, causal, scale, dtype=q.dtype)
    pytorch_err = max(max_abs(rounded.double() - ref), max_abs(same_dtype.double() - ref))
    return 2 * pytorch_err + {torch.float64: 1e-12, torch.float32: 2e-6}.get(q.dtype, 1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal,cases", [(False, CROSS), (True, SELF)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_op_matches_naive(device, causal, cases, dtype, gen):
    for lq, lk in cases:
        for dim in (32, 64):
            q, k, v, cu_q, cu_k = make(lq, lk, 3, dim, dtype, device, gen)
            out = ops.text_query_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal)
            assert out.dtype == dtype and out.shape == q.shape
            ref = naive(q, k, v, cu_q, cu_k, causal, dim**-0.5)
            err = max_abs(out.double() - ref)
            assert err <= max_error_allowed(out, ref, q, k, v, cu_q, cu_k, causal, dim**-0.5), (lq, lk, dim, err)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_naive(device, causal, gen):
    lq, lk = ([5, 1, 0, 7], [5, 1, 0, 7]) if causal else ([5, 1, 0, 7], [9, 3, 2, 0])
    q, k, v, cu_q, cu_k = make(lq, lk, 2, 32, torch.float64, device, gen)
    grad = torch.randn_like(q)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    ops.text_query_attention(*ins, cu_q, cu_k, max(lq), max(lk), causal=causal, scale=0.3).backward(grad)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    naive(*ref, cu_q, cu_k, causal, 0.3).backward(grad)
    for a, b in zip(ins, ref):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-10)
    if device == "cpu":
        fn = lambda a, b, c: ops.text_query_attention(a, b, c, cu_q, cu_k, max(lq), max(lk), causal=causal)  # noqa: E731
        assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in (q, k, v)))


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another memory layout: the head dim strided (nothing contiguous), or rows of a wider
    tensor (head dim contiguous, rows not)."""
    if how == "head dim strided":
        return t.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., : t.shape[-1]] = t
    return wide[..., : t.shape[-1]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["q", "k", "v", "qkv"])
@pytest.mark.parametrize("how", ["head dim strided", "rows of a wider tensor"])
@pytest.mark.parametrize("causal,lq,lk", [(False, [6], [9]), (False, [6, 6], [9, 9]), (True, [7, 7], [7, 7]),
                                          (False, [6, 2], [9, 4])])  # fmt: skip
def test_any_memory_layout(device, which, how, causal, lq, lk, gen):
    """Inputs in any layout give the contiguous inputs' results, forward and backward. PyTorch's CPU flash kernels
    (which the reference calls) read the head dim as contiguous whatever its stride: q's on torch 2.14 (outputs off
    by 1e18), k's and v's too on 2.13 (a 1-utterance batch of the tokenizer took values strided so). Equal lengths
    make the padded batch a view of the inputs, so their layout reaches the kernel."""
    for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-10)):
        q, k, v, cu_q, cu_k = make(lq, lk, 2, 32, dtype, device, gen)
        ins = {n: _layout(t, how) if n in which else t for n, t in zip("qkv", (q, k, v))}
        assert all(torch.equal(ins[n], t) for n, t in zip("qkv", (q, k, v)))
        ins = {n: t.requires_grad_() for n, t in ins.items()}
        out = ops.text_query_attention(ins["q"], ins["k"], ins["v"], cu_q, cu_k, max(lq), max(lk), causal=causal)
        ref_ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = naive(*ref_ins, cu_q, cu_k, causal, 32**-0.5)
        torch.testing.assert_close(out.double(), ref.detach(), atol=tol, rtol=tol)
        grad = torch.randn(q.shape, generator=gen, dtype=dtype).to(device)
        out.backward(grad)
        ref.backward(grad.double())
        for n, r in zip("qkv", ref_ins):
            torch.testing.assert_close(ins[n].grad.double(), r.grad, atol=10 * tol, rtol=10 * tol)


@pytest.mark.parametrize("device", DEVICES)
def test_no_key_at_all_gives_zeros_and_zero_gradients(device, gen):
    """Every sequence without keys (max_seqlen_k 0): PyTorch's CPU kernel would divide by zero; the op returns 0."""
    q, k, v, cu_q, cu_k = make([2, 3], [0, 0], 2, 32, torch.float32, device, gen)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ops.text_query_attention(*ins, cu_q, cu_k, 3, 0)
    assert torch.equal(out, torch.zeros_like(q))
    out.sum().backward()
    assert torch.equal(ins[0].grad, torch.zeros_like(q)) and ins[1].grad.shape == (0, 2, 32)


@pytest.mark.parametrize("causal,cases", [(False, CROSS), (True, SELF)])
def test_reference_formula_path_used_off_cpu(monkeypatch, causal, cases, gen):
    """The reference's plain-formula path (devices without PyTorch's CPU attention kernel, e.g. float64 on
    CUDA), exercised on CPU tensors: values and gradients against the naive attention."""
    monkeypatch.setattr(reference, "_cpu_attention_kernel", lambda q: False)
    for lq, lk in cases:
        q, k, v, cu_q, cu_k = make(lq, lk, 2, 32, torch.float64, "cpu", gen)
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out = ops.text_query_attention(*ins, cu_q, cu_k, max(lq), max(lk), causal=causal)
        ref_ins = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = naive(*ref_ins, cu_q, cu_k, causal, 32**-0.5)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
        grad = torch.randn_like(ref)
        out.backward(grad)
        ref.backward(grad)
        for a, b in zip(ins, ref_ins):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, gen):
    q, k, v, cu_q, cu_k = make([3, 0, 4], [5, 2, 4], 2, 32, torch.float32, device, gen)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.taste.text_query_attention, (q, k, v, cu_q, cu_k, 4, 5, False, 0.2))
    torch.library.opcheck(torch.ops.taste.text_query_attention, (q, k, v, cu_q, cu_k, 4, 5, True, 0.2))


def test_compiles_fullgraph(gen):
    q, k, v, cu_q, cu_k = make([3, 6], [50, 20], 2, 32, torch.float32, "cpu", gen)
    fn = lambda q, k, v: ops.text_query_attention(q, k, v, cu_q, cu_k, 6, 50).sum(-1)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))


BAD = [
    (lambda q, k, v, c: ops.text_query_attention(q, k[:, :1], v, c, c, 4, 4), r"k and v must have shape"),
    (lambda q, k, v, c: ops.text_query_attention(q, k.double(), v, c, c, 4, 4), r"one dtype"),
    (lambda q, k, v, c: ops.text_query_attention(q[0], k, v, c, c, 4, 4), r"q must be a floating-point \(rows"),
    (lambda q, k, v, c: ops.text_query_attention(q, k, v, c.long(), c, 4, 4), r"cu_seqlens_q must be a 1-D int32"),
    (lambda q, k, v, c: ops.text_query_attention(q, k, v, c, c[:1], 4, 4), r"cu_seqlens_k must have shape \(2,\)"),
    (lambda q, k, v, c: ops.text_query_attention(q, k, v, c, c, 3, 4), r"exceeds its max_seqlen=3"),
    (lambda q, k, v, c: ops.text_query_attention(q, k, v, c - 1, c, 4, 4), r"must start at 0"),
]


@pytest.mark.parametrize("call,match", BAD)
def test_bad_input(call, match):
    q = torch.randn(4, 2, 32)
    with pytest.raises(RuntimeError, match=match):
        call(q, q.clone(), q.clone(), make_cu([4]))


# ---- the Triton kernels themselves -------------------------------------------------------------------------


def _triton_check(device, lq, lk, dim, dtype, causal, splits, gen, scale=None):
    from taste.kernels.attention import text_query_attention_fwd
    from taste.kernels.attention_bwd import text_query_attention_bwd

    q, k, v, cu_q, cu_k = make(lq, lk, 2, dim, dtype, device, gen)
    scale = dim**-0.5 if scale is None else scale
    out, lse = text_query_attention_fwd(q, k, v, cu_q, cu_k, max(lq), max(lk), causal, scale, num_splits=splits)
    ref = naive(q, k, v, cu_q, cu_k, causal, scale)
    assert max_abs(out.double() - ref) <= max_error_allowed(out, ref, q, k, v, cu_q, cu_k, causal, scale)
    alone, no_lse = text_query_attention_fwd(q, k, v, cu_q, cu_k, max(lq), max(lk), causal, scale, num_splits=splits,
                                             want_lse=False)  # fmt: skip
    assert no_lse is None and torch.equal(alone, out)  # inference: the same output, no log-sum-exp made or stored
    _check_chunked_launches(q, k, v, cu_q, cu_k, max(lq), max(lk), causal, scale)
    _, lse_ref = reference.text_query_attention(
        *(t.double().cpu() for t in (q, k, v)), cu_q.cpu(), cu_k.cpu(), max(lq), max(lk), causal, scale
    )
    lse_ref = lse_ref.to(device)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    finite = torch.isfinite(lse_ref)
    torch.testing.assert_close(
        lse[finite].double(), lse_ref[finite], atol=1e-3 if dtype != torch.float32 else 1e-5, rtol=1e-3
    )
    grad = torch.randn(q.shape, generator=gen).to(device, dtype)
    dq, dk, dv = text_query_attention_bwd(grad, q, k, v, out, lse, cu_q, cu_k, max(lq), max(lk), causal, scale)
    ins = [t.double().requires_grad_() for t in (q, k, v)]
    naive(*ins, cu_q, cu_k, causal, scale).backward(grad.double())
    tol = 5e-5 if dtype == torch.float32 else 3e-2
    for name, a, b in zip("qkv", (dq, dk, dv), ins):
        err = max_abs(a.double() - b.grad)
        assert err <= tol * max(1.0, max_abs(b.grad)), (name, err)
    again = text_query_attention_bwd(grad, q, k, v, out, lse, cu_q, cu_k, max(lq), max(lk), causal, scale)
    assert all(torch.equal(a, b) for a, b in zip((dq, dk, dv), again)), "backward is not deterministic"


def _check_chunked_launches(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, per_chunk=2):
    """The chunked cross-attention's launches (``seqs``, a given output, no log-sum-exp): ``per_chunk`` sequences at a
    time, over keys that hold only theirs, give bit for bit the output of one launch without key splits (the same
    tiles over the same rows and keys)."""
    from taste.kernels.attention import text_query_attention_fwd

    whole, _ = text_query_attention_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, num_splits=1)
    out = torch.full_like(q, float("nan"))
    batch = cu_q.numel() - 1
    for b0 in range(0, batch, per_chunk):
        b1 = min(b0 + per_chunk, batch)
        ks, ke = int(cu_k[b0]), int(cu_k[b1])
        text_query_attention_fwd(q, k[ks:ke], v[ks:ke], cu_q, cu_k[b0 : b1 + 1] - ks, max_q, max_k, causal, scale,
                                 out=out, seqs=(b0, b1))  # fmt: skip
    assert torch.equal(out, whole)


@on_triton_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # no bf16 tl.dot in the interpreter (STYLE.md)
@pytest.mark.parametrize("causal,cases", [(False, CROSS[:3] + CROSS[4:]), (True, SELF)])
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_kernels_in_interpreter(dtype, causal, cases, splits, gen):
    for lq, lk in cases:
        _triton_check("cpu", lq, lk, 32, dtype, causal, splits, gen)
    _triton_check("cpu", [70], [70 if causal else 130], 64, dtype, causal, splits, gen)  # several tiles
    # whole key blocks that run unmasked next to masked ones: Lk > Lq (causal shift 80), and several query tiles
    _triton_check("cpu", [70, 5], [150, 64], 64, dtype, causal, splits, gen)


@on_triton_interpreter
@pytest.mark.parametrize("causal", [False, True])
def test_triton_kernels_head_dim_128_in_interpreter(causal, gen):
    """Head dim 128 at 16 bits (float16: the interpreter cannot multiply bfloat16), whose backward has tiles of its
    own (32-key blocks): several query tiles and key blocks, a partial last block, a length-1 sequence."""
    _triton_check("cpu", [70, 1], [70, 1] if causal else [100, 9], 128, torch.float16, causal, 1, gen)


@on_triton_interpreter
@pytest.mark.parametrize("causal", [False, True])
# The backward recomputes P = exp2(S x scale - LSE) before it zeroes the keys a causal row does not see: with a
# negative scale those can overflow to inf (NumPy warns in the interpreter; a GPU's exp2 gives inf silently), and the
# mask then drops them; the gradients below are checked.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
def test_triton_kernels_with_zero_and_negative_scale(causal, gen):
    """A zero scale (uniform attention) and a negative one, which takes the forward's general path (row maxima over
    scaled scores; maxima over unscaled ones would overflow here): forward, log-sum-exp and gradients against the
    naive attention."""
    for scale in (0.0, -8.0):
        _triton_check("cpu", [5, 70, 1], [5, 70, 1] if causal else [40, 130, 3], 32, torch.float16, causal, 1, gen,
                      scale)  # fmt: skip


@on_triton_interpreter
def test_fixed_tiles_shrink_where_shared_memory_is_short(monkeypatch, gen):
    """A GPU whose shared memory cannot hold the fixed tiles (Turing has 64 KB a block) makes Triton refuse their
    builds; the forward and both backward kernels then take smaller ones: one pipeline stage, then halved key
    blocks. Here every tile with 2 stages or 64-key blocks is refused. The results stay right, and the tile that
    fitted is remembered: a second call tries nothing else."""
    from taste.kernels import attention_bwd

    kernels = (attention._text_query_attention_fwd_kernel, attention_bwd._text_query_attention_bwd_dkdv_kernel,
               attention_bwd._text_query_attention_bwd_dq_kernel)  # fmt: skip
    tried = refuse_tiles(monkeypatch, kernels, lambda meta: meta["num_stages"] > 1 or meta["BLOCK_N"] > 32)
    _triton_check("cpu", [70, 5], [150, 64], 64, torch.float16, False, 1, gen)
    for kernel in kernels:
        tiles = [(t["BLOCK_N"], t["num_stages"]) for name, t in tried if name == kernel.__name__]
        # the fixed tile, one stage, then 32-key blocks; _triton_check's second backward runs the fitted tile alone
        assert tiles[:3] == [(64, 2), (64, 1), (32, 1)] and set(tiles[3:]) <= {(32, 1)}, (kernel.__name__, tiles)
    tried.clear()
    _triton_check("cpu", [70, 5], [150, 64], 64, torch.float16, False, 1, gen)
    assert all(t["BLOCK_N"] == 32 and t["num_stages"] == 1 for _, t in tried), tried
    _triton_check("cpu", [70, 5], [70, 5], 64, torch.float16, True, 3, gen)  # causal, key splits


@on_triton_interpreter
def test_tile_that_fitted_is_remembered_per_first_tile(monkeypatch, gen):
    """The fitted choice of one problem (128-query tiles, shrunk to 32 x 16) must not be applied to another whose
    fixed tile is smaller (16-query tiles: a shorter list of smaller tiles)."""
    kernel = attention._text_query_attention_fwd_kernel
    tried = refuse_tiles(monkeypatch, [kernel], lambda m: m["num_stages"] > 1 or m["BLOCK_N"] > 16 or m["BLOCK_M"] > 32)
    for lq, lk in (([70, 5], [150, 64]), ([9, 5], [40, 64]), ([70, 5], [150, 64])):
        tried.clear()
        q, k, v, cu_q, cu_k = make(lq, lk, 2, 32, torch.float16, "cpu", gen)
        out, _ = attention.text_query_attention_fwd(q, k, v, cu_q, cu_k, max(lq), max(lk), False, 32**-0.5)
        ref = naive(q, k, v, cu_q, cu_k, False, 32**-0.5)
        assert (out.double() - ref).abs().max().item() <= max_error_allowed(out, ref, q, k, v, cu_q, cu_k, False,
                                                                            32**-0.5)  # fmt: skip
        assert tried[-1][1]["BLOCK_N"] == 16 and tried[-1][1]["BLOCK_M"] <= 32
    assert len(tried) == 1  # the third call repeats the first problem: its fitted tile, straight away


@on_triton_interpreter
def test_raw_row_maximum_gives_identical_results(monkeypatch, gen):
    """The unmasked blocks' maxima over unscaled scores, scaled once, give bit-identical outputs and log-sum-exps
    to maxima over the scaled scores (rounding is monotonic)."""
    q, k, v, cu_q, cu_k = make([70, 5], [200, 64], 2, 32, torch.float16, "cpu", gen)
    runs, flags = [], attention._fwd_flags.__wrapped__  # (uncached)
    for raw in (True, False):
        monkeypatch.setattr(attention, "_fwd_flags", lambda *args, raw=raw: flags(*args[:-1], raw))
        runs.append(attention.text_query_attention_fwd(q, k, v, cu_q, cu_k, 70, 200, False, 0.3, num_splits=1))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@on_triton_interpreter
@pytest.mark.parametrize("tiles", range(len(attention.FWD_TILES) if attention else 0))
def test_every_autotuner_tile_in_interpreter(tiles, monkeypatch, gen):
    """Each forward tile the autotuner may pick, through the tuned launch path (a one-config tuner runs it
    without timing): the same results as the naive attention, causal or not, with and without key splits."""
    one = attention.FWD_TILES[tiles : tiles + 1]
    monkeypatch.setattr(attention, "tuned_fwd_kernel", lambda: attention.autotuned(
        attention._text_query_attention_fwd_kernel, one, ("BLOCK_M", "BLOCK_N"), ()))  # fmt: skip
    for causal, (lq, lk) in ((False, ([5, 1, 0, 150], [40, 3, 7, 200])), (True, ([5, 1, 0, 140], [5, 1, 0, 150]))):
        q, k, v, cu_q, cu_k = make(lq, lk, 2, 32, torch.float16, "cpu", gen)
        for splits in (1, 2):
            out, _ = attention.text_query_attention_fwd(q, k, v, cu_q, cu_k, max(lq), max(lk), causal, 32**-0.5,
                                                        num_splits=splits, autotune=True)  # fmt: skip
            ref = naive(q, k, v, cu_q, cu_k, causal, 32**-0.5)
            err = (out.double() - ref).abs().max().item()
            assert err <= max_error_allowed(out, ref, q, k, v, cu_q, cu_k, causal, 32**-0.5), (causal, splits, err)


def _tuner_with_fake_timings(monkeypatch):
    """The forward's tuner over two tiles, 64-row tiles timed faster (the interpreter has no benchmarker; the tuner's
    own choice, the launch and the results are real), installed as the launcher's."""
    tuner = attention.tuned_fwd_kernel(((32, 32, 4, 2), (64, 32, 4, 2)))
    fake_ms = {32: 2.0, 64: 1.0}
    monkeypatch.setattr(tuner, "_bench", lambda *a, config, **kw: [fake_ms[config.kwargs["BLOCK_M"]], 0.0, 0.0])
    monkeypatch.setattr(tuner, "cache_results", False, raising=False)  # Triton's disk cache needs a GPU driver
    monkeypatch.setattr(attention, "tuned_fwd_kernel", lambda: tuner)
    return tuner


def _tuned_forwards_match_naive(problems, gen):
    """Runs the autotuned forward on each (query lengths, key lengths) problem, checked against the naive one."""
    for lq, lk in problems:
        q, k, v, cu_q, cu_k = make(lq, lk, 2, 32, torch.float16, "cpu", gen)
        out, _ = attention.text_query_attention_fwd(q, k, v, cu_q, cu_k, 40, 60, False, 32**-0.5, num_splits=1,
                                                    autotune=True)  # fmt: skip
        ref = naive(q, k, v, cu_q, cu_k, False, 32**-0.5)
        assert (out.double() - ref).abs().max().item() <= max_error_allowed(out, ref, q, k, v, cu_q, cu_k, False,
                                                                            32**-0.5)  # fmt: skip


@on_triton_interpreter
def test_autotuner_keys_by_batch_class_and_keeps_every_timing(monkeypatch, gen):
    """The forward's tuner tunes again for another power-of-two batch class (how many programs fill the GPU) and
    keeps every candidate's time of every tuning, not only the last one's. Timings are faked (the interpreter has
    no benchmarker); the tuner's own choice, the launch and the results are real."""
    from taste.kernels import tuning_timings

    tuner = _tuner_with_fake_timings(monkeypatch)
    _tuned_forwards_match_naive((([5, 40], [50, 60]), ([5, 40, 1, 3, 9], [50, 60, 2, 7, 9]), ([9, 40], [50, 3])), gen)
    timings = tuning_timings(tuner)
    assert len(tuner.cache) == 2 and list(timings) == [str(key) for key in tuner.cache]  # batches 2, 5 (class 8), 2
    buckets = [key[:3] for key in tuner.cache]
    assert buckets == [(64, 64, 2), (64, 64, 8)], buckets
    for times in timings.values():
        assert sorted(times.values()) == [1.0, 2.0]
        assert times[min(times, key=times.get)] == 1.0 and "BLOCK_M: 64" in min(times, key=times.get)
    assert all(config.kwargs["BLOCK_M"] == 64 for config in tuner.cache.values())


@on_triton_interpreter
def test_a_settled_problem_class_launches_the_kernel_directly(monkeypatch, gen):
    """Once the tuner has picked tiles for a problem class, the next launch of that class goes straight to the kernel
    with them (kernels.launch_tuned: Triton's Autotuner.run costs host time at every launch), with the same results;
    another class (here a batch of 5: class 8) goes through the tuner again."""
    skip_unless_launches_go_through_run()
    from taste import kernels

    monkeypatch.setattr(kernels, "_SETTLED", {})
    tuner = _tuner_with_fake_timings(monkeypatch)
    through_tuner, launched = [], []
    tuner_run, kernel_run = tuner.run, tuner.fn.run
    monkeypatch.setattr(tuner, "run", lambda *a, **kw: through_tuner.append(1) or tuner_run(*a, **kw))
    monkeypatch.setattr(tuner.fn, "run", lambda *a, **kw: launched.append(kw["BLOCK_M"]) or kernel_run(*a, **kw))
    _tuned_forwards_match_naive((([5, 40], [50, 60]), ([9, 33], [50, 3]), ([5, 40, 1, 3, 9], [50, 60, 2, 7, 9])), gen)
    assert len(through_tuner) == 2 and launched == [64, 64, 64], (through_tuner, launched)


def test_launch_tuned_keeps_only_a_settled_choice(monkeypatch):
    """A tuner run that settles nothing (bench/compile_kernels.py compiles every candidate instead of timing them)
    is not remembered: the next launch goes through the tuner again."""
    pytest.importorskip("triton")
    from taste import kernels

    monkeypatch.setattr(kernels, "_SETTLED", {})
    calls = []

    class Tuner:
        best_config = "stale"
        fn = {"grid": lambda *a, **kw: calls.append("direct")}

        def __getitem__(self, grid):
            return lambda *a, **kw: calls.append("tuner")

    tuner = Tuner()
    kernels.launch_tuned(tuner, ("key",), "grid", 1, x=2)
    kernels.launch_tuned(tuner, ("key",), "grid", 1, x=2)
    assert calls == ["tuner", "tuner"] and tuner.best_config is None


@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_triton_kernels_on_gpu(dim, dtype, causal, splits, gen):
    cases = SELF + [([100, 200, 7], [100, 200, 7])] if causal else CROSS + [([100, 150, 3], [1500, 1500, 1500])]
    for lq, lk in cases:
        _triton_check("cuda", lq, lk, dim, dtype, causal, splits, gen)


@pytest.mark.parametrize("dim,causal,splits", [(64, False, 1), (128, True, 3)])  # each tunes 11 configs
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_autotuned_forward_on_gpu(dim, causal, splits, gen):
    """The tiles the autotuner picks (large bf16 problems) give the fixed tiles' results."""
    from taste.kernels.attention import text_query_attention_fwd

    lq, lk = ([100, 144, 3], [100, 144, 3]) if causal else ([100, 144, 3], [1500, 1500, 7])
    q, k, v, cu_q, cu_k = make(lq, lk, 4, dim, torch.bfloat16, "cuda", gen)
    args = (q, k, v, cu_q, cu_k, max(lq), max(lk), causal, dim**-0.5)
    tuned, tuned_lse = text_query_attention_fwd(*args, num_splits=splits, autotune=True)
    ref = naive(q, k, v, cu_q, cu_k, causal, dim**-0.5)
    assert (tuned.double() - ref).abs().max().item() <= max_error_allowed(tuned, ref, q, k, v, cu_q, cu_k, causal,
                                                                          dim**-0.5)  # fmt: skip
    fixed, fixed_lse = text_query_attention_fwd(*args, num_splits=splits, autotune=False)
    torch.testing.assert_close(tuned_lse, fixed_lse, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_cuda_op_uses_triton_and_backward_matches(device, gen):
    lq, lk = [100, 37, 1], [1500, 1500, 1500]
    q, k, v, cu_q, cu_k = make(lq, lk, 20, 64, torch.bfloat16, device, gen)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ops.text_query_attention(*ins, cu_q, cu_k, 100, 1500)
    ref = naive(q, k, v, cu_q, cu_k, False, 0.125)
    assert (out.double() - ref).abs().max().item() < max_error_allowed(out, ref, q, k, v, cu_q, cu_k, False, 0.125)
    out.float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in ins)


# ---- text_query_cross_attention: K/V projected from dense states chunk by chunk (inference) -----------------


def make_cross(lq, frames, heads, dim, d_in, dtype, device, gen):
    """Queries (Nq, H, D), states (B, E, d_in), projection weights (H*D, d_in) and a value bias."""
    q = torch.randn(sum(lq), heads, dim, generator=gen).to(device, dtype)
    h_key, h_val = (torch.randn(len(lq), frames, d_in, generator=gen).to(device, dtype) for _ in range(2))
    k_w, v_w = (torch.randn(heads * dim, d_in, generator=gen).div(d_in**0.5).to(device, dtype) for _ in range(2))
    v_b = torch.randn(heads * dim, generator=gen).to(device, dtype)
    return q, h_key, h_val, k_w, v_w, v_b, make_cu(lq, device)


def naive_cross(q, h_key, h_val, k_w, v_w, v_b, cu_q, scale):
    """float64 projections of every frame, then the per-sequence softmax attention."""
    b, e, _ = h_key.shape
    k = (h_key.double() @ k_w.double().T).reshape(b * e, *q.shape[1:])
    v = (h_val.double() @ v_w.double().T + (0 if v_b is None else v_b.double())).reshape(b * e, *q.shape[1:])
    cu_k = make_cu([e] * b, q.device)
    return naive(q.double(), k, v, cu_q, cu_k, False, scale)


CROSS_STATES = [[1], [5, 1, 0, 17, 3], [0, 0, 4], [33, 9]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 1, 2, 7])
def test_cross_attention_matches_naive_and_reference(device, dtype, chunk, gen):
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 6e-2}[dtype]
    for lq in CROSS_STATES:
        q, h_key, h_val, k_w, v_w, v_b, cu = make_cross(lq, 19, 2, 32, 24, dtype, device, gen)
        out = ops.text_query_cross_attention(q, h_key, h_val, k_w, v_w, cu, max(lq), v_bias=v_b, chunk_size=chunk)
        assert out.dtype == dtype and out.shape == q.shape
        ref = naive_cross(q, h_key, h_val, k_w, v_w, v_b, cu, 32**-0.5)
        assert (out.double() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item()), (lq, chunk)
        plain = reference.text_query_cross_attention(q, h_key, h_val, k_w, None, v_w, v_b, cu, max(lq))
        torch.testing.assert_close(out, plain, atol=tol, rtol=tol)  # chunking moves only GEMM rounding


def test_cross_attention_equals_projected_text_query_attention(gen):
    q, h_key, h_val, k_w, v_w, v_b, cu = make_cross([4, 7, 2], 11, 3, 32, 16, torch.float32, "cpu", gen)
    k_b = torch.randn(96, generator=gen)
    k = torch.nn.functional.linear(h_key, k_w, k_b).reshape(33, 3, 32)
    v = torch.nn.functional.linear(h_val, v_w, v_b).reshape(33, 3, 32)
    want = ops.text_query_attention(q, k, v, cu, make_cu([11] * 3), 7, 11, scale=0.3)
    got = ops.text_query_cross_attention(q, h_key, h_val, k_w, v_w, cu, 7, k_bias=k_b, v_bias=v_b, chunk_size=2,
                                         scale=0.3)  # fmt: skip
    torch.testing.assert_close(got, want)


@on_triton_interpreter
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_cross_attention_triton_chunks_in_interpreter(chunk, gen):
    """The Triton path: each chunk's kernel reads its sequences' query offsets from the batch's and writes global
    rows."""
    from taste.ops_attention import _cross_attention_chunks

    lq = [5, 1, 0, 17, 3]
    q, h_key, h_val, k_w, v_w, v_b, cu = make_cross(lq, 9, 2, 32, 16, torch.float32, "cpu", gen)
    out = _cross_attention_chunks(q, h_key, h_val, k_w, None, v_w, v_b, cu, 17, chunk, 32**-0.5, triton_path=True)
    ref = naive_cross(q, h_key, h_val, k_w, v_w, v_b, cu, 32**-0.5)
    assert (out.double() - ref).abs().max().item() < 1e-4


@on_triton_interpreter
@pytest.mark.parametrize("store_lse", [False, True])
def test_forward_into_given_output_writes_only_the_named_sequences(store_lse, gen):
    """``seqs=(b0, b1)`` with a given output: sequences b0..b1-1 of the batch's offsets over keys that hold only
    theirs; every other row of the output (and of the log-sum-exp, when one is given) keeps what it held."""
    lq, lk = [4, 7, 0, 5, 3], [6, 9, 3, 8, 2]
    q, k, v, cu_q, cu_k = make(lq, lk, 2, 32, torch.float32, "cpu", gen)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((2, q.shape[0]), float("nan")) if store_lse else None
    ks, ke = int(cu_k[1]), int(cu_k[4])  # sequences 1..3's keys, and their offsets with a spare entry after them
    cu_k_chunk = torch.tensor([0, 9, 12, 20, 25], dtype=torch.int32)
    got, got_lse = attention.text_query_attention_fwd(q, k[ks:ke], v[ks:ke], cu_q, cu_k_chunk, 7, 9, False,
                                                      32**-0.5, out=out, lse=lse, seqs=(1, 4))  # fmt: skip
    assert got is out and got_lse is lse
    rows = slice(int(cu_q[1]), int(cu_q[4]))
    ref = naive(q, k, v, cu_q, cu_k, False, 32**-0.5)
    assert max_abs(out[rows].double() - ref[rows]) < 1e-5
    assert out[: rows.start].isnan().all() and out[rows.stop :].isnan().all()
    if store_lse:
        want = torch.logsumexp(torch.einsum("qhd,khd->hqk", q[rows], k[ks:ke]).double() * 32**-0.5 +
                               block_diagonal_mask(lq[1:4], lk[1:4]), -1)  # fmt: skip
        torch.testing.assert_close(lse[:, rows].double(), want)
        assert lse[:, : rows.start].isnan().all() and lse[:, rows.stop :].isnan().all()
    with pytest.raises(ValueError, match="seqs needs out"):
        attention.text_query_attention_fwd(q, k, v, cu_q, cu_k, 7, 9, False, 1.0, seqs=(0, 1))
    for seqs in ((4, 6), (3, 2), (-1, 1)):
        with pytest.raises(ValueError, match=r"seqs must satisfy 0 <= b0 <= b1 <= 5"):
            attention.text_query_attention_fwd(q, k, v, cu_q, cu_k, 7, 9, False, 1.0, out=out, seqs=seqs)


def block_diagonal_mask(lq, lk):
    """(sum lq, sum lk): 0 where query and key are in the same sequence, -inf elsewhere."""
    seq_q = torch.repeat_interleave(torch.arange(len(lq)), torch.tensor(lq))
    seq_k = torch.repeat_interleave(torch.arange(len(lk)), torch.tensor(lk))
    return torch.where(seq_q[:, None] == seq_k[None], 0.0, float("-inf")).double()


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_cross_attention_on_gpu_chunked_equals_whole(device, gen):
    lq = [100, 37, 1, 0, 64]
    q, h_key, h_val, k_w, v_w, v_b, cu = make_cross(lq, 1500, 20, 64, 1280, torch.bfloat16, device, gen)
    whole = ops.text_query_cross_attention(q, h_key, h_val, k_w, v_w, cu, 100, v_bias=v_b)
    chunked = ops.text_query_cross_attention(q, h_key, h_val, k_w, v_w, cu, 100, v_bias=v_b, chunk_size=2)
    # the same kernel per sequence, but a smaller grid splits the keys (a log-sum-exp combine) where the whole batch
    # fills the GPU: sums in another order, so bfloat16's tolerance (measured on an H200: at most 3.2e-4 apart)
    torch.testing.assert_close(chunked, whole, atol=1e-2, rtol=1.6e-2)
    ref = naive_cross(q, h_key, h_val, k_w, v_w, v_b, cu, 0.125)
    assert (chunked.double() - ref).abs().max().item() < 3e-2 * ref.abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
def test_cross_attention_opcheck_and_compile(device, gen):
    q, h_key, h_val, k_w, v_w, v_b, cu = make_cross([3, 0, 4], 6, 2, 32, 8, torch.float32, device, gen)
    args = (q, h_key, h_val, k_w, None, v_w, v_b, cu, 4, 2, 0.2)
    torch.library.opcheck(torch.ops.taste.text_query_cross_attention, args)
    fn = lambda q, hk, hv: ops.text_query_cross_attention(q, hk, hv, k_w, v_w, cu, 4, v_bias=v_b, chunk_size=2)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, h_key, h_val), fn(q, h_key, h_val))


BAD_CROSS = [
    (lambda q, h, w, b, c: ops.text_query_cross_attention(q, h, h[:, :1], w, w, c, 4), r"h_key and h_val must both"),
    (lambda q, h, w, b, c: ops.text_query_cross_attention(q, h, h, w[:, :3], w, c, 4), r"k_weight must be \(H \* D"),
    (lambda q, h, w, b, c: ops.text_query_cross_attention(q, h, h, w, w, c, 4, v_bias=b[:5]), r"v_bias must be"),
    (lambda q, h, w, b, c: ops.text_query_cross_attention(q, h.double(), h, w, w, c, 4), r"h_key must have q's"),
    (lambda q, h, w, b, c: ops.text_query_cross_attention(q, h, h, w, w, c, 4, chunk_size=0), r"chunk_size must"),
    (lambda q, h, w, b, c: ops.text_query_cross_attention(q, h, h, w, w, c[:1], 4), r"cu_seqlens_q must have"),
    (lambda q, h, w, b, c: ops.text_query_cross_attention(q, h, h, w.requires_grad_(), w, c, 4), r"inference only"),
    (lambda q, h, w, b, c: ops.text_query_cross_attention_folded(q, h, h[:, :1], w, w, c, 4), r"h_key and h_val must"),
    (lambda q, h, w, b, c: ops.text_query_cross_attention_folded(q, h, h, w, w[:, :3], c, 4), r"v_weight must be \(H"),
    (lambda q, h, w, b, c: ops.text_query_cross_attention_folded(q, h, h, w, w, c, 4, k_bias=b[:5]), r"k_bias must"),
    (lambda q, h, w, b, c: ops.text_query_cross_attention_folded(q, h, h, w.double(), w, c, 4), r"k_weight must have"),
    (lambda q, h, w, b, c: ops.text_query_cross_attention_folded(q, h, h, w, w, c, 3), r"exceeds its max_seqlen=3"),
]


@pytest.mark.parametrize("call,match", BAD_CROSS)
def test_cross_attention_bad_input(call, match):
    q, h = torch.randn(4, 2, 32), torch.randn(1, 5, 8)
    with pytest.raises(RuntimeError, match=match):
        call(q, h, torch.randn(64, 8), torch.randn(64), make_cu([4]))


# ---- text_query_cross_attention_folded: the K/V projections folded into the queries and outputs -------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_folded_cross_attention_matches_naive_and_projected(dtype, gen):
    """Equal to projecting every frame, including a key bias (the softmax cancels it) and a sequence, or all of
    them, without queries; H x D need not equal d_in."""
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 6e-2}[dtype]
    for lq in CROSS_STATES:
        for heads, dim, d_in in ((2, 32, 24), (3, 16, 64)):
            q, h_key, h_val, k_w, v_w, v_b, cu = make_cross(lq, 19, heads, dim, d_in, dtype, "cpu", gen)
            k_b = torch.randn(heads * dim, generator=gen).to(dtype)
            for v_bias in (v_b, None):
                out = ops.text_query_cross_attention_folded(q, h_key, h_val, k_w, v_w, cu, max(lq), k_bias=k_b,
                                                            v_bias=v_bias)  # fmt: skip
                assert out.dtype == dtype and out.shape == q.shape
                ref = naive_cross(q, h_key, h_val, k_w, v_w, v_bias, cu, dim**-0.5)
                assert (out.double() - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item()), lq
                projected = reference.text_query_cross_attention(q, h_key, h_val, k_w, k_b, v_w, v_bias, cu, max(lq))
                torch.testing.assert_close(out, projected, atol=tol, rtol=tol)


def test_folded_cross_attention_gradients_equal_the_projected_ones(gen):
    """float64 gradients of every input through the folded path equal those through projected K/V; the key bias
    gets none (its true gradient is 0: the softmax cancels it)."""
    q, h_key, h_val, k_w, v_w, v_b, cu = make_cross([5, 1, 0, 9], 13, 2, 32, 24, torch.float64, "cpu", gen)
    k_b = torch.randn(64, generator=gen, dtype=torch.float64)
    ins = [t.requires_grad_() for t in (q, h_key, h_val, k_w, v_w, v_b, k_b)]
    weights = torch.randn(q.shape, generator=gen, dtype=torch.float64)

    def projected():
        k = torch.nn.functional.linear(h_key, k_w, k_b).reshape(-1, 2, 32)
        v = torch.nn.functional.linear(h_val, v_w, v_b).reshape(-1, 2, 32)
        return ops.text_query_attention(q, k, v, cu, make_cu([13] * 4), 9, 13)

    folded = ops.text_query_cross_attention_folded(q, h_key, h_val, k_w, v_w, cu, 9, k_bias=k_b, v_bias=v_b)
    got = torch.autograd.grad((folded * weights).sum(), ins, allow_unused=True)
    want = torch.autograd.grad((projected() * weights).sum(), ins)
    for name, g, w in zip(("q", "h_key", "h_val", "k_weight", "v_weight", "v_bias"), got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10, msg=name)
    assert got[-1] is None and want[-1].abs().max().item() < 1e-12


def test_folded_cross_attention_without_frames_or_queries(gen):
    q, h_key, h_val, k_w, v_w, v_b, cu = make_cross([3, 2], 0, 2, 32, 8, torch.float32, "cpu", gen)
    out = ops.text_query_cross_attention_folded(q, h_key, h_val, k_w, v_w, cu, 3, v_bias=v_b)
    assert torch.equal(out, torch.zeros_like(q))  # no key: 0, as text_query_attention gives (no bias added)
    q, h_key, h_val, k_w, v_w, v_b, cu = make_cross([0, 0], 5, 2, 32, 8, torch.float32, "cpu", gen)
    assert ops.text_query_cross_attention_folded(q, h_key, h_val, k_w, v_w, cu, 0, v_bias=v_b).shape == (0, 2, 32)


def test_folded_cross_attention_takes_strided_weights_and_states(gen):
    q, h_key, h_val, k_w, v_w, v_b, cu = make_cross([4, 7], 9, 2, 32, 24, torch.float32, "cpu", gen)
    want = ops.text_query_cross_attention_folded(q, h_key, h_val, k_w, v_w, cu, 7, v_bias=v_b)
    strided = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (h_key, h_val, k_w, v_w)]
    assert not any(t.is_contiguous() for t in strided)
    torch.testing.assert_close(ops.text_query_cross_attention_folded(q, *strided, cu, 7, v_bias=v_b), want)


def test_folded_cross_attention_compiles(gen):
    q, h_key, h_val, k_w, v_w, v_b, cu = make_cross([3, 0, 4], 6, 2, 32, 8, torch.float32, "cpu", gen)
    fn = lambda q, hk, hv: ops.text_query_cross_attention_folded(q, hk, hv, k_w, v_w, cu, 4, v_bias=v_b)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, h_key, h_val), fn(q, h_key, h_val))


def test_cross_attention_folds_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # TASTE's aggregator (H = 20, d_in = 1280): utterances of up to 54 queries fold on the CPU, never on CUDA
    assert ops.cross_attention_folds(54, 20, 1280, 1500, cpu) and not ops.cross_attention_folds(55, 20, 1280, 1500, cpu)
    assert not ops.cross_attention_folds(10, 20, 1280, 1500, cuda)
    assert not ops.cross_attention_folds(10, 20, 1280, 0, cpu)  # no frames: nothing to save
    assert not ops.cross_attention_folds(1, 1, 1280, 1500, cpu)  # one head: folding saves nothing


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_folded_cross_attention_on_gpu(device, gen):
    """On CUDA the folded attention runs the Triton kernel at head dim d_in (here 64); widths it lacks are refused."""
    q, h_key, h_val, k_w, v_w, v_b, cu = make_cross([30, 1, 0, 12], 300, 4, 32, 64, torch.float32, device, gen)
    out = ops.text_query_cross_attention_folded(q, h_key, h_val, k_w, v_w, cu, 30, v_bias=v_b)
    ref = naive_cross(q, h_key, h_val, k_w, v_w, v_b, cu, 32**-0.5)
    assert (out.double() - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())
    q, h_key, h_val, k_w, v_w, v_b, cu = make_cross([3], 5, 2, 32, 24, torch.float32, device, gen)
    with pytest.raises(RuntimeError, match=r"encoder width d_in, which on CUDA must be one of"):
        ops.text_query_cross_attention_folded(q, h_key, h_val, k_w, v_w, cu, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_run_in_the_autocast_dtype(device, gen):
    """Autocast does not reach custom ops by itself: under torch.autocast the three attention ops cast their
    floating inputs to its dtype (as F.linear and F.scaled_dot_product_attention), so they equal the ops on inputs
    cast beforehand, and mixed float32 / 16-bit inputs are taken (they were refused: "must have one dtype")."""
    low = torch.bfloat16
    q, k, v, cu_q, cu_k = make([5, 1, 9], [7, 3, 12], 2, 32, torch.float32, device, gen)
    hq, h_key, h_val, k_w, v_w, v_b, cu = make_cross([4, 0, 6], 11, 2, 32, 32, torch.float32, device, gen)  # (d_in 32:
    # the folded op's CUDA kernel takes 32, 64 or 128)
    k_b = torch.randn(64, generator=gen).to(device)

    def calls(cast):
        c = (lambda t: t.to(low)) if cast else (lambda t: t)
        return [
            lambda: ops.text_query_attention(c(q), c(k), c(v), cu_q, cu_k, 9, 12, causal=False),
            lambda: ops.text_query_cross_attention(
                c(hq), c(h_key), c(h_val), c(k_w), c(v_w), cu, 6, k_bias=c(k_b), v_bias=c(v_b), chunk_size=2
            ),  # fmt: skip
            lambda: ops.text_query_cross_attention_folded(
                c(hq), c(h_key), c(h_val), c(k_w), c(v_w), cu, 6, k_bias=c(k_b), v_bias=c(v_b)
            ),  # fmt: skip
        ]

    want = [fn() for fn in calls(cast=True)]
    with torch.autocast(device, dtype=low):
        got = [fn() for fn in calls(cast=False)]
        mixed = ops.text_query_attention(q.to(low), k, v, cu_q, cu_k, 9, 12)
    for g, w in zip(got, want):
        assert g.dtype == low
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    torch.testing.assert_close(mixed, want[0], atol=0, rtol=0)
    with torch.autocast(device, dtype=low):  # float64 inputs stay float64, as autocast leaves them
        assert ops.text_query_attention(q.double(), k.double(), v.double(), cu_q, cu_k, 9, 12).dtype == torch.float64
