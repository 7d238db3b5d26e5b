"""rvq_encode / rvq_quantize / rvq_decode / rvq_ema_statistics: op (reference on CPU, Triton on CUDA), and the
Triton kernels themselves (interpreter on CPU, native on a GPU), against a float64 greedy search."""

import pytest
import torch
from conftest import DEVICES, HAS_CUDA, assert_close, on_triton_interpreter, refuse_tiles

from taste import ops, reference

try:
    from taste.kernels import rvq as rvq_kernels
except ImportError:  # no Triton: the kernel tests skip
    rvq_kernels = None


def greedy_float64(x, codebooks, num_stages):
    """Plain residual nearest-neighbour search with torch.cdist in float64."""
    r = x.double()
    idx = torch.full((x.shape[0], codebooks.shape[0]), -1, dtype=torch.long)
    quantized = torch.zeros_like(r)
    for s in range(num_stages):
        best = torch.cdist(r, codebooks[s].double()).argmin(-1) if x.shape[0] else torch.zeros(0, dtype=torch.long)
        idx[:, s] = best
        quantized += codebooks[s].double()[best]
        r = r - codebooks[s].double()[best]
    return idx, quantized


def problem(n, q, k, d, gen, device="cpu", dtype=torch.float32):
    x = torch.randn(n, d, generator=gen).to(device, dtype)
    codebooks = (torch.randn(q, k, d, generator=gen) * 0.6).to(device, dtype)
    return x, codebooks


def grid_problem(n, q, k, d, gen, device="cpu", dtype=torch.float32):
    """Rows and codewords on a grid of quarters (|x| <= 2, |c| <= 1.5): every product, sum and distance the search
    makes is exact in float32, and the operands exact in bf16 and tf32, whatever the summation order. So equal
    codewords get equal distances in any tile, BLAS or GPU, and the lowest index must win; random data would test
    the BLAS instead (OpenBLAS's Haswell sgemm, which the Triton interpreter's dots run on AMD EPYC machines, rounds
    the same column differently at different positions of a tile). Stage 0's last code equals its first and row 0
    sits on it: an exact tie across code tiles, which code 0 must win."""
    x = torch.randint(-8, 9, (n, d), generator=gen) / 4
    codebooks = torch.randint(-6, 7, (q, k, d), generator=gen) / 4
    codebooks[0, -1] = codebooks[0, 0]
    x[:1] = codebooks[0, :1]
    return x.to(device, dtype), codebooks.to(device, dtype)


def assert_nearest(x, codebooks, idx, sq_err, stages, rtol):
    """Each stage's chosen codeword is a nearest one to the float64 residual that the chosen ones before it left,
    within ``rtol`` of the squared distances' scale (what any summation order guarantees on data with near ties),
    and ``sq_err`` holds those residuals' squared norms."""
    r, cb, idx = x.double().cpu(), codebooks.double().cpu(), idx.cpu()
    for s in range(stages):
        dist = torch.cdist(r, cb[s]).square()  # (N, K)
        chosen = dist.gather(1, idx[:, s : s + 1])[:, 0]
        scale = r.square().sum(-1) + cb[s].square().sum(-1).max()
        assert (chosen - dist.min(1).values <= rtol * scale).all(), f"stage {s}: not a nearest codeword"
        r = r - cb[s][idx[:, s]]
        torch.testing.assert_close(sq_err[:, s].cpu().double(), r.square().sum(-1), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [0, 1, 37, 1000])
@pytest.mark.parametrize("stages", [4, 2, 0])
def test_encode_matches_float64_search(device, n, stages, gen):
    x, codebooks = problem(n, 4, 96, 40, gen, device)
    idx, quantized = ops.rvq_encode(x, codebooks, stages)
    ref_idx, ref_q = greedy_float64(x.cpu(), codebooks.cpu(), stages)
    assert idx.dtype == torch.int64 and idx.shape == (n, 4)
    assert torch.equal(idx.cpu(), ref_idx)
    torch.testing.assert_close(quantized.double().cpu(), ref_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.rvq_decode(idx, codebooks).double().cpu(), ref_q, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_lowest_index(device, gen):
    x, codebooks = problem(8, 2, 64, 16, gen, device)
    codebooks[0, 40] = codebooks[0, 9]  # duplicate codewords
    codebooks[0, 63] = codebooks[0, 9]
    codebooks[1, 50] = codebooks[1, 2]
    x[:4] = codebooks[0, 9]  # exactly on the duplicated codeword
    idx, _ = ops.rvq_encode(x, codebooks)
    assert idx[:4, 0].tolist() == [9, 9, 9, 9]
    assert not (idx[:, 0] == 40).any() and not (idx[:, 1] == 50).any()


@pytest.mark.parametrize("device", DEVICES)
def test_num_stages_as_device_tensor(device, gen):
    x, codebooks = problem(20, 4, 32, 16, gen, device)
    a, qa = ops.rvq_encode(x, codebooks, torch.tensor(3, device=device))
    b, qb = ops.rvq_encode(x, codebooks, 3)
    assert torch.equal(a, b) and torch.equal(qa, qb) and (a[:, 3] == -1).all() and (a[:, :3] >= 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_loss_and_gradients_match_manual_straight_through(device, gen):
    x, codebooks = problem(50, 4, 32, 16, gen, device, torch.float64)
    xg = x.clone().requires_grad_()
    out = ops.rvq_quantize(xg, codebooks, 3)
    (out.quantized.square().sum() + 7 * out.commit_loss).backward()
    xr = x.clone().requires_grad_()
    r, outs, loss = xr, [], 0.0
    for s in range(3):  # vector-quantize-pytorch's ResidualVQ, straight-through, no rotation trick
        c = codebooks[s][out.indices[:, s]]
        outs.append(r + (c - r).detach())
        loss = loss + ((c.detach() - r) ** 2).mean()
        r = r - c.detach()
    (sum(outs).square().sum() + 7 * loss).backward()
    torch.testing.assert_close(out.commit_loss, loss)
    torch.testing.assert_close(xg.grad, xr.grad, atol=1e-10, rtol=1e-10)
    assert out.stage_losses[3] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_ema_statistics(device, gen):
    x, codebooks = problem(300, 3, 16, 8, gen, device)
    idx, _ = ops.rvq_encode(x, codebooks, 2)
    counts, sums = ops.rvq_ema_statistics(x, idx, codebooks)
    residual = x.double()
    for s in range(3):
        onehot = torch.nn.functional.one_hot(idx[:, s].clamp(min=0), 16).double() * (idx[:, s] >= 0)[:, None]
        torch.testing.assert_close(counts[s].double(), onehot.sum(0))
        torch.testing.assert_close(sums[s].double(), onehot.T @ residual, atol=1e-4, rtol=1e-5)
        residual = residual - codebooks[s].double()[idx[:, s].clamp(min=0)] * (idx[:, s] >= 0)[:, None]
    assert counts[2].sum() == 0
    assert counts.dtype == sums.dtype == torch.float32
    # All stages in one segment sum equal one segment sum per stage bit for bit (residuals subtracted in order).
    residual = x
    for s in range(3):
        stage_sums, stage_counts = ops.segment_sum_by_key(residual, idx[:, s], 16)
        assert torch.equal(sums[s], stage_sums) and torch.equal(counts[s], stage_counts.float())
        residual = residual - codebooks[s][idx[:, s].clamp(min=0)] * (idx[:, s] >= 0)[:, None]
    wide = ops.rvq_ema_statistics(x.double(), idx, codebooks.double())  # float64 rows: float64 sums (were float32)
    assert wide[0].dtype == wide[1].dtype == torch.float64
    torch.testing.assert_close(wide[1], sums.double(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, gen):
    x, codebooks = problem(9, 2, 16, 8, gen, device)
    stages = torch.tensor(2, device=device)
    torch.library.opcheck(torch.ops.taste.rvq_encode, (x.requires_grad_(), codebooks, stages, False))
    idx, _ = ops.rvq_encode(x.detach(), codebooks)
    torch.library.opcheck(torch.ops.taste.rvq_decode, (idx, codebooks, None))
    torch.library.opcheck(torch.ops.taste.rvq_decode, (idx, codebooks, torch.rand(9, 2, device=device)))


def test_compiles_fullgraph(gen):
    x, codebooks = problem(33, 4, 32, 16, gen)
    stages = torch.tensor(3)

    def fn(x):
        out = ops.rvq_quantize(x, codebooks, stages)
        return out.quantized, out.commit_loss, ops.rvq_decode(out.indices, codebooks)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(x), fn(x)):
        torch.testing.assert_close(a, b)


BAD = [
    (lambda x, c: ops.rvq_encode(x.long(), c), r"x must be a floating-point \(N, d\)"),
    (lambda x, c: ops.rvq_encode(x[:, :5], c), r"x has d=5 but codebooks are \(Q, K, d\) = \(2, 16, 8\)"),
    (lambda x, c: ops.rvq_encode(x, c[0]), r"codebooks must be a floating-point \(Q, K, d\)"),
    (lambda x, c: ops.rvq_encode(x, c, 3), r"num_stages must be in \[0, 2\]"),
    (lambda x, c: ops.rvq_decode(torch.tensor([[0, 16]]), c), r"indices must lie in \[-1, K=16\)"),
    (lambda x, c: ops.rvq_decode(torch.tensor([[0, -2]]), c), r"indices must lie in"),
    (lambda x, c: ops.rvq_decode(torch.tensor([[0, 1, 2]]), c), r"indices must be \(N, Q=2\)"),
    (lambda x, c: ops.rvq_decode(torch.tensor([[0.0, 1.0]]), c), r"indices must be an int64"),
    # (all stages share one segment sum there: a code of K would count for the next stage's code 0)
    (lambda x, c: ops.rvq_ema_statistics(x, torch.tensor([[16, 0]] * 4), c), r"indices must lie in \[-1, K=16\)"),
    (lambda x, c: ops.rvq_ema_statistics(x, torch.tensor([[-2, 0]] * 4), c), r"indices must lie in"),
    (lambda x, c: ops.rvq_ema_statistics(x, torch.zeros(3, 2, dtype=torch.long), c), r"indices must be \(4, Q=2\)"),
    (lambda x, c: ops.rvq_ema_statistics(x[:, :5], torch.zeros(4, 2, dtype=torch.long), c), r"x has d=5"),
]


@pytest.mark.parametrize("call,match", BAD)
def test_bad_input(call, match, gen):
    x, codebooks = problem(4, 2, 16, 8, gen)
    with pytest.raises(RuntimeError, match=match):
        call(x, codebooks)


# ---- the Triton kernels themselves --------------------------------------------------------------------------


def _kernel_check(device, n, d, k, gen, fast=False, dtype=torch.float32):
    """The encoder and decoder kernels against the reference: on grid data (exact arithmetic, a tie between the
    first and the last code tile) the same indices, ties to the lowest; on random data a nearest codeword at every
    stage, and the same index for nearly every row (near ties may round either way in another summation order)."""
    from taste.kernels.rvq import rvq_decode_fwd, rvq_encode_fwd

    for make in (grid_problem, problem):
        x, codebooks = make(n, 4, k, d, gen, device, dtype)
        codebooks[2, k - 1] = codebooks[2, 0]  # a tie
        for stages in (4, 1):
            ns = torch.tensor(stages, dtype=torch.int32, device=device)
            idx, quantized, sq_err = rvq_encode_fwd(x, codebooks, codebooks.float().square().sum(-1), ns, fast)
            ref_idx, ref_q, ref_err = reference.rvq_encode(x, codebooks, stages)
            if make is grid_problem:
                assert idx[0, 0] == 0  # the tie across code tiles (grid_problem)
                assert torch.equal(idx, ref_idx)
                torch.testing.assert_close(sq_err, ref_err.float(), atol=1e-3, rtol=1e-4)
            elif fast:  # tf32 / bf16 products: near ties go either way more often
                # A row whose stage s went the other way follows another residual in the stages after it; and at small
                # N one such row is already 3% (tests/fuzz_kernels.py: N=31, fp16, one near tie at stage 1).
                differ = (idx != ref_idx).any(1).sum().item()
                assert differ <= max(2, 0.02 * n), f"{differ} of {n} rows"
                assert_nearest(x, codebooks, idx, sq_err, stages, rtol=1e-2)
            else:
                assert_nearest(x, codebooks, idx, sq_err, stages, rtol=1e-5)
            # 16-bit outputs: the kernel sums in float32 and rounds once; compare with the float64 sum
            assert_close(quantized, reference.rvq_decode(idx, codebooks.double()))
            weights = torch.rand(n, 4, generator=gen).to(device)
            expected = reference.rvq_decode(idx, codebooks.double(), weights)
            assert_close(rvq_decode_fwd(idx, codebooks, weights), expected)


@on_triton_interpreter
def test_triton_kernels_in_interpreter(gen):
    _kernel_check("cpu", 45, 48, 80, gen)  # odd N, d not a power of two, K not a multiple of the tile
    _kernel_check("cpu", 1, 16, 64, gen)
    _kernel_check("cpu", 20, 8, 16, gen)  # d below the 16 that tl.dot needs on a GPU: padded block


@on_triton_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoder_takes_sliced_tiles_where_shared_memory_is_short(dtype, monkeypatch, gen):
    """The fixed whole-row tile keeps (64, d) code tiles in shared memory: 96 KB at d 256, more than Turing (64 KB)
    or, with a newer compiler, Ada (99 KB) may give a block. Refused there, the launcher takes one stage, then the
    sliced layout (16 KB): the same indices. bfloat16 rows: the sliced residual gets a float32 scratch."""
    tried = refuse_tiles(monkeypatch, [rvq_kernels._rvq_encode_fwd_kernel], lambda meta: meta["BLOCK_DS"] == 0)
    x, codebooks = grid_problem(45, 4, 80, 48, gen, "cpu", dtype)
    codebooks[2, 79] = codebooks[2, 0]  # a tie
    ns = torch.tensor(3, dtype=torch.int32)
    idx, quantized, sq_err = rvq_kernels.rvq_encode_fwd(x, codebooks, codebooks.float().square().sum(-1), ns, False)
    assert [(t["BLOCK_DS"], t["num_stages"]) for _, t in tried] == [(0, 2), (0, 1), (32, 2)]
    ref_idx, _, ref_err = reference.rvq_encode(x, codebooks, 3)
    assert torch.equal(idx, ref_idx)
    assert_close(quantized, reference.rvq_decode(idx, codebooks.double()))
    torch.testing.assert_close(sq_err, ref_err.float(), atol=1e-3, rtol=1e-4)


@on_triton_interpreter
def test_kernel_refuses_codewords_wider_than_its_tiles(gen):
    """d above MAX_DIM would need more shared memory than a GPU block has: the launcher says so; taste.ops takes
    the PyTorch path there (test_wide_codewords_on_gpu)."""
    d = rvq_kernels.MAX_DIM + 1
    x, codebooks = problem(3, 2, 16, d, gen)
    ns = torch.tensor(2, dtype=torch.int32)
    with pytest.raises(ValueError, match=rf"codeword dim d={d} is above the kernel's MAX_DIM=512"):
        rvq_kernels.rvq_encode_fwd(x, codebooks, codebooks.square().sum(-1), ns, False)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_wide_codewords_on_gpu(gen):
    x, codebooks = problem(300, 4, 64, 1280, gen, "cuda")  # an RVQ without its 1280 -> 256 projection
    idx, quantized = ops.rvq_encode(x, codebooks)
    ref_idx, ref_q, _ = reference.rvq_encode(x.cpu(), codebooks.cpu(), 4)
    assert torch.equal(idx.cpu(), ref_idx)
    torch.testing.assert_close(quantized.cpu(), ref_q, atol=1e-4, rtol=1e-4)


@on_triton_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_exact_mode_on_16bit_codebooks_in_interpreter(dtype, gen):
    """The exact mode multiplies 16-bit inputs in float32 (the launcher widens the codebooks): identical indices."""
    _kernel_check("cpu", 45, 48, 80, gen, dtype=dtype)


@on_triton_interpreter
@pytest.mark.parametrize(
    "mode, tiles, dtype",
    [(m, i, dt) for m, ts in getattr(rvq_kernels, "ENCODE_TILES", {}).items() for i in range(len(ts))
     for dt in ([torch.float32, torch.bfloat16] if m == "exact" else [torch.float32])],
)  # fmt: skip
def test_every_autotuner_tile_in_interpreter(mode, tiles, dtype, monkeypatch, gen):
    """Each encoder tile the autotuner may pick in each mode, through the tuned launch path (a one-config tuner
    runs it without timing): indices identical to the float64-checked reference, ties included (the
    interpreter computes the fast mode's products in float32 too). bfloat16 rows: the sliced layout's residual then
    lives in a scratch of its own, not in the output."""
    rvq = rvq_kernels
    one = rvq.ENCODE_TILES[mode][tiles : tiles + 1]
    monkeypatch.setattr(rvq, "tuned_encode_kernel", lambda m: rvq.autotuned(
        rvq._rvq_encode_fwd_kernel, one, rvq.ENCODE_TILE_NAMES, ()) if m == mode else None)  # fmt: skip
    x, codebooks = grid_problem(45, 4, 80, 48, gen, "cpu", dtype)
    codebooks[2, 79] = codebooks[2, 0]  # a tie
    ns = torch.tensor(3, dtype=torch.int32)
    norms = codebooks.float().square().sum(-1)
    idx, quantized, sq_err = rvq.rvq_encode_fwd(x, codebooks, norms, ns, mode == "fast", autotune=True)
    ref_idx, ref_q, ref_err = reference.rvq_encode(x, codebooks, 3)
    assert torch.equal(idx, ref_idx)
    assert_close(quantized, reference.rvq_decode(idx, codebooks.double()))  # summed in float32, rounded once
    torch.testing.assert_close(sq_err, ref_err.float(), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_triton_kernels_on_gpu(fast, dtype, gen):
    _kernel_check("cuda", 6400, 256, 512, gen, fast=fast, dtype=dtype)
    _kernel_check("cuda", 33, 48, 80, gen, fast=fast)
    _kernel_check("cuda", 20, 8, 16, gen, fast=fast)
