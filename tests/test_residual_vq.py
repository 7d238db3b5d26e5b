"""taste.ResidualVQ against vector-quantize-pytorch's ResidualVQ (the library the official TASTE code copied)."""

import copy
import inspect

import pytest
import torch
from conftest import HAS_CUDA, on_two_ranks

import taste
from taste.rvq import OFFICIAL_PREFIX, kmeans

vqp = pytest.importorskip("vector_quantize_pytorch")

KW = dict(dim=64, num_quantizers=4, codebook_size=32, codebook_dim=16, decay=0.9)


def pair(seed=0):
    torch.manual_seed(seed)
    # rotation_trick=False: the plain straight-through estimator of the official TASTE copy (spec 1.6).
    ref = vqp.ResidualVQ(**KW, kmeans_init=False, quantize_dropout=False, rotation_trick=False)
    ours = taste.ResidualVQ(**KW, kmeans_init=False, quantize_dropout=False)
    assert str(ours.load_state_dict(ref.state_dict(), strict=True)) == "<All keys matched successfully>"
    return ref, ours


def test_eval_indices_and_outputs_identical():
    ref, ours = pair()
    ref.eval(), ours.eval()
    x = torch.randn(500, 64)
    q_ref, idx_ref, _ = ref(x[None])
    q, idx, loss = ours(x)
    assert torch.equal(idx, idx_ref[0])
    torch.testing.assert_close(q, q_ref[0], atol=1e-6, rtol=1e-5)
    assert loss == 0
    ours.train()  # encode: the eval codes whatever the mode, and no EMA step
    embed = ours.embed.clone()
    assert torch.equal(ours.encode(x), idx) and torch.equal(ours.embed, embed)


def test_one_training_step_matches_outputs_loss_gradients_and_ema():
    ref, ours = pair(1)
    ref.train(), ours.train()
    x = torch.randn(300, 64)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    q_ref, idx_ref, losses_ref = ref(xr[None])
    q, idx, loss = ours(xo)
    assert torch.equal(idx, idx_ref[0])
    torch.testing.assert_close(q, q_ref[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss, losses_ref.sum())
    (q_ref.square().sum() + losses_ref.sum()).backward()
    (q.square().sum() + loss).backward()
    torch.testing.assert_close(xo.grad, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.project_in.weight.grad, ref.project_in.weight.grad, atol=1e-3, rtol=1e-5)
    for s in range(4):  # the EMA step gives the same codebooks and statistics
        cb = ref.layers[s]._codebook
        torch.testing.assert_close(ours.embed[s], cb.embed[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours.embed_avg[s], cb.embed_avg[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours.cluster_size[s], cb.cluster_size[0], atol=1e-6, rtol=1e-5)


def test_benchmarks_plain_loop_trains_the_codebooks_as_ours():
    """bench/rvq.py's cdist + argmin loop does the same training step as ours (EMA update included, the plain way),
    so that its times compare equal work."""
    from baselines import CdistLoop

    _, ours = pair(2)
    twin = copy.deepcopy(ours)
    x = torch.randn(300, 64)
    q, idx, loss = ours.train()(x)
    q_loop, idx_loop, loss_loop = CdistLoop(twin).train()(x)
    assert torch.equal(idx, idx_loop)
    torch.testing.assert_close(q_loop, q)
    torch.testing.assert_close(loss_loop, loss)
    for name in ("embed", "embed_avg", "cluster_size"):
        torch.testing.assert_close(getattr(twin, name), getattr(ours, name), atol=1e-6, rtol=1e-5)
    assert not torch.equal(twin.embed, pair(2)[1].embed)  # (the step changed the codebooks)


def test_dead_codes_take_rows_of_their_stages_input_residual():
    torch.manual_seed(5)
    rvq = taste.ResidualVQ(**KW, kmeans_init=False, quantize_dropout=False, threshold_ema_dead_code=1e6)
    before = rvq.embed.clone()
    x = torch.randn(300, 64)
    _, idx, _ = rvq.train()(x)  # every code's count is below the threshold: every codeword is replaced
    with torch.no_grad():
        residual = rvq.project_in(x)
    for s in range(4):
        found = (rvq.embed[s][:, None] == residual[None]).all(-1)  # (K, N): codeword k is row n
        assert found.any(1).all(), s
        assert not found.all(0).any()  # (not one row for all: rows are drawn)
        residual = residual - before[s][idx[:, s]]  # the next stage's input, with the forward's codebooks
    assert torch.equal(rvq.cluster_size, torch.full_like(rvq.cluster_size, 1e6))
    torch.testing.assert_close(rvq.embed_avg, rvq.embed * 1e6)


def test_training_steps_with_quantizer_dropout_match():
    """Steps with stages dropped: vector-quantize-pytorch does not run a dropped layer at all, so its EMA
    statistics and codebook stay as they were; ours must leave them too (a decay toward zero counts would shorten
    the moving average of the later stages, which run in fewer steps)."""
    import random

    torch.manual_seed(6)
    ref = vqp.ResidualVQ(**KW, kmeans_init=False, quantize_dropout=True, rotation_trick=False).train()
    ours = taste.ResidualVQ(**KW, kmeans_init=False, quantize_dropout=True)
    ours.load_state_dict(ref.state_dict())
    ours.train()
    depths = []
    for step, seed in enumerate((3, 11, 5, 8, 1)):
        depth = random.Random(seed).randrange(0, 4) + 1  # the stages vector-quantize-pytorch runs for this seed
        depths.append(depth)
        ours._draw_num_stages = lambda device, depth=depth: torch.tensor(depth, device=device)
        x = torch.randn(200, 64)
        _, idx_ref, _ = ref(x[None], rand_quantize_dropout_fixed_seed=seed)
        _, idx, _ = ours(x)
        assert torch.equal(idx, idx_ref[0]), step
        for s in range(4):
            cb = ref.layers[s]._codebook
            torch.testing.assert_close(ours.embed[s], cb.embed[0], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(ours.embed_avg[s], cb.embed_avg[0], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(ours.cluster_size[s], cb.cluster_size[0], atol=1e-6, rtol=1e-5)
    assert min(depths) < 4 and max(depths) == 4, depths  # (stages dropped in some steps, none in one)


def test_helpers_of_the_spec():
    _, ours = pair(2)
    ours.eval()
    x = torch.randn(40, 64)
    _, idx, _ = ours(x)
    code = ours.get_code_from_indices(idx)
    assert code.shape == (40, 16)
    torch.testing.assert_close(ours.get_output_from_indices(idx), ours.project_out(code))
    # get_indices_from_code is the greedy residual search on the code itself (not an inverse of the encoder).
    r, expected = code.double(), []
    for s in range(4):
        best = torch.cdist(r, ours.embed[s].double()).argmin(-1)
        expected.append(best)
        r = r - ours.embed[s].double()[best]
    assert torch.equal(ours.get_indices_from_code(code), torch.stack(expected, 1))
    dropped = idx.clone()
    dropped[:, 2:] = -1
    torch.testing.assert_close(ours.get_code_from_indices(dropped), ours.embed[0][idx[:, 0]] + ours.embed[1][idx[:, 1]])


def test_kmeans_init_quantizer_dropout_and_dead_codes():
    torch.manual_seed(3)
    rvq = taste.ResidualVQ(**KW, kmeans_iters=10, quantize_dropout=True, threshold_ema_dead_code=0.5)
    assert not rvq.initted.any()
    x = torch.randn(400, 64)
    depths = set()
    for _ in range(12):
        _, idx, loss = rvq(x)
        depths.add(int((idx >= 0).all(0).sum()))
        assert torch.isfinite(loss)
    assert rvq.initted.all()
    assert depths == {1, 2, 3, 4}, depths  # every prefix depth is drawn
    # k-means gives codebooks that quantize far better than a random draw of rows.
    rvq.eval()
    z = rvq.project_in(x).float()
    kmeans_err = (z - rvq.get_code_from_indices(rvq(x)[1])).square().mean()
    assert kmeans_err < 0.8 * z.square().mean()


def test_kmeans_initialises_each_stage_on_the_first_batch_it_runs_in():
    """Under quantizer dropout vector-quantize-pytorch does not run a dropped layer, so a stage is k-means-initialised
    on the first batch in which it runs: the same stages are initialised after each step here."""
    import random

    torch.manual_seed(8)
    ref = vqp.ResidualVQ(**KW, kmeans_init=True, kmeans_iters=3, quantize_dropout=True, rotation_trick=False).train()
    ours = taste.ResidualVQ(**KW, kmeans_iters=3, quantize_dropout=True).train()
    x = torch.randn(3, 120, 64)
    for step, seed in enumerate((2, 1, 0)):  # depths 1, 2 and 4
        depth = random.Random(seed).randrange(0, 4) + 1
        ours._draw_num_stages = lambda device, depth=depth: torch.tensor(depth, device=device)
        before = ours.embed.clone()
        ref(x[step][None], rand_quantize_dropout_fixed_seed=seed)
        ours(x[step])
        want = [float(layer._codebook.initted) for layer in ref.layers]
        assert ours.initted.tolist() == want == [1.0] * depth + [0.0] * (4 - depth), step
        assert torch.equal(ours.embed[depth:], before[depth:])  # (stages that did not run: untouched)
        assert ours._initted_seen == (depth == 4)
    assert ours.embed.abs().sum((1, 2)).min() > 0


def test_searching_stages_that_kmeans_never_initialised_warns_once():
    """vector-quantize-pytorch's eval forward on codebooks that k-means has not initialised gives code 0 for every
    row without a word (a seed model's `taste encode`, or stages that quantizer dropout kept out of a short run).
    Ours warns once per module, naming the stages; initialised codebooks, built or loaded, never warn."""
    import warnings

    x = torch.randn(40, 64)
    fresh = taste.ResidualVQ(**KW).eval()
    assert fresh.uninitialised_stages() == [0, 1, 2, 3]
    with pytest.warns(UserWarning, match=r"ResidualVQ stages \[0, 1, 2, 3\] of 4 were never initialised"):
        _, idx, _ = fresh(x)
    assert not idx.any()  # (what the warning is about)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh(x), fresh.encode(x)  # once per module
    partial = taste.ResidualVQ(**KW, kmeans_iters=2).train()
    partial._draw_num_stages = lambda device: torch.tensor(2, device=device)
    partial(x)
    with pytest.warns(UserWarning, match=r"stages \[2, 3\] of 4 were never initialised"):
        codes = partial.encode(x)  # (the codes-only search, in either mode)
    assert codes[:, :2].any() and not codes[:, 2:].any()
    trained = taste.ResidualVQ(**KW, kmeans_iters=2, quantize_dropout=False).train()
    trained(x)
    loaded = taste.ResidualVQ(**KW)
    loaded.load_state_dict(trained.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for module in (trained.eval(), loaded.eval(), taste.ResidualVQ(**KW, kmeans_init=False).eval()):
            module(x), module.encode(x)
            assert module.uninitialised_stages() == [] and module._initted_seen
    torch._dynamo.reset()  # under torch.compile: no warning, no read of the buffer, one graph
    compiled = torch.compile(taste.ResidualVQ(**KW).eval(), fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not compiled(x)[1].any()


def test_kmeans_assigns_centroids_to_cluster_means():
    torch.manual_seed(4)
    centers = torch.tensor([[5.0] * 8, [-5.0] * 8, [5.0] * 4 + [-5.0] * 4, [-5.0] * 4 + [5.0] * 4])
    x = (centers[:, None] + 0.1 * torch.randn(4, 50, 8)).reshape(-1, 8)
    means, bins = kmeans(x, 4, 25)
    assert sorted(bins.tolist()) == [50.0] * 4
    for c in centers:
        assert (means - c).norm(dim=1).min() < 0.2


def test_official_checkpoint_layout():
    ref, ours = pair(5)
    state = {OFFICIAL_PREFIX + k: v for k, v in ref.state_dict().items()}
    for s in range(4):  # the official checkpoint stores initted as [1] and has unused implicit-codebook MLPs
        state[f"{OFFICIAL_PREFIX}layers.{s}._codebook.initted"] = torch.ones(1)
    state[f"{OFFICIAL_PREFIX}mlps.0.layers.0.0.weight"] = torch.zeros(16, 16)
    fresh = taste.ResidualVQ(**KW)
    fresh.load_official_state_dict(state)
    assert torch.equal(fresh.embed, ours.embed) and fresh.initted.all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="decay must be in"):
        taste.ResidualVQ(**{**KW, "decay": 1.5})
    with pytest.raises(ValueError, match="must be positive"):
        taste.ResidualVQ(**{**KW, "codebook_size": 0})
    with pytest.raises(ValueError, match=r"eps must be > 0 \(Laplace smoothing of the EMA counts\), got 0.0"):
        taste.ResidualVQ(**{**KW, "eps": 0.0})  # before: NaN codewords for every code no row chose
    with pytest.raises(ValueError, match="kmeans_iters must be >= 0, got -1"):
        taste.ResidualVQ(**{**KW, "kmeans_iters": -1})
    with pytest.raises(ValueError, match="threshold_ema_dead_code must be >= 0"):
        taste.ResidualVQ(**{**KW, "threshold_ema_dead_code": -1.0})


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(
    "x,got",
    [
        (torch.randn(4, 63), r"torch.float32 \(4, 63\)"),  # before: "mat1 and mat2 shapes cannot be multiplied"
        (torch.randn(2, 4, 64), r"torch.float32 \(2, 4, 64\)"),  # before: the projected shape (2, 4, 16)
        (torch.ones(4, 64, dtype=torch.long), r"torch.int64 \(4, 64\)"),  # before: "must have the same dtype"
    ],
)
def test_bad_input_is_named_in_the_callers_terms(x, got, train):
    rvq = taste.ResidualVQ(**KW).train(train)
    for call in (rvq, rvq.encode):
        with pytest.raises(ValueError, match=r"x must be a floating-point \(N, dim=64\) tensor, got " + got):
            call(x)


def test_kmeans_init_keeps_the_ema_state_consistent():
    """After k-means initialisation the EMA sums are means x counts (as vector-quantize-pytorch), so one more EMA
    step on the same batch leaves the codebook where k-means put it instead of shrinking it by the counts."""
    torch.manual_seed(6)
    centers = torch.randn(4, 8) * 5
    x = (centers[:, None] + 0.1 * torch.randn(4, 60, 8)).reshape(-1, 8)
    rvq = taste.ResidualVQ(dim=8, codebook_dim=8, num_quantizers=1, codebook_size=4, kmeans_iters=10,
                           quantize_dropout=False).train()  # fmt: skip
    rvq(x)
    torch.testing.assert_close(rvq.embed_avg[0], rvq.embed[0] * rvq.cluster_size[0][:, None], atol=1e-3, rtol=1e-3)
    before = rvq.embed.clone()
    rvq(x)
    assert (rvq.embed - before).abs().max() < 0.05


def _twins(kmeans_init: bool):
    torch.manual_seed(7)
    eager = taste.ResidualVQ(**KW, kmeans_init=kmeans_init, kmeans_iters=5, quantize_dropout=False).train()
    twin = taste.ResidualVQ(**KW, kmeans_init=kmeans_init, kmeans_iters=5, quantize_dropout=False).train()
    twin.load_state_dict(eager.state_dict())
    return eager, twin


def _assert_same_steps(eager, compiled, module, steps=3):
    for step in range(steps):
        x = torch.randn(90, 64)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(100 + step)  # the k-means sample of the first step draws from the global generator
        q_e, idx_e, loss_e = eager(xe)
        torch.manual_seed(100 + step)
        q_c, idx_c, loss_c = compiled(xc)
        assert torch.equal(idx_c, idx_e), step
        torch.testing.assert_close(q_c, q_e)
        torch.testing.assert_close(loss_c, loss_e)
        (q_e.square().sum() + loss_e).backward()
        (q_c.square().sum() + loss_c).backward()
        torch.testing.assert_close(xc.grad, xe.grad)
    for name, buf in eager.named_buffers():  # the EMA steps (and k-means) moved both alike
        torch.testing.assert_close(getattr(module, name), buf, msg=name)


def test_training_steps_compile_fullgraph():
    """Training forward, backward and EMA update in one graph: whether the codebooks are initialised is a host bool
    known since construction or a load (it was read from the buffer inside the graph: a data-dependent error)."""
    eager, twin = _twins(kmeans_init=False)
    torch._dynamo.reset()
    _assert_same_steps(eager, torch.compile(twin, fullgraph=True, backend="aot_eager"), twin)
    fresh = taste.ResidualVQ(**KW, quantize_dropout=False)  # k-means pending, until a load brings initialised ones
    fresh.load_state_dict(twin.state_dict())
    torch._dynamo.reset()
    _assert_same_steps(eager, torch.compile(fresh.train(), fullgraph=True, backend="aot_eager"), fresh)


def test_kmeans_init_runs_outside_a_compiled_graph():
    """k-means reads the codebooks' state on the host once: a graph break around it (then one graph per step); with
    fullgraph=True a clear error until one step has run."""
    eager, twin = _twins(kmeans_init=True)
    torch._dynamo.reset()
    says_why = "reason" in inspect.signature(torch.compiler.disable).parameters  # (older torch: no reason given)
    with pytest.raises(Exception, match="k-means initialisation" if says_why else "disable"):
        torch.compile(twin, fullgraph=True, backend="aot_eager")(torch.randn(90, 64))
    assert not twin.initted.any()
    torch._dynamo.reset()
    _assert_same_steps(eager, torch.compile(twin, backend="aot_eager"), twin)
    assert twin.initted.all()
    pending = taste.ResidualVQ(**KW, kmeans_iters=5, quantize_dropout=False)  # (every stage runs: all initialised)
    pending.load_state_dict(taste.ResidualVQ(**KW).state_dict())  # an uninitialised state: k-means still to run
    pending.train()(torch.randn(90, 64))
    assert pending.initted.all() and pending.embed.abs().sum() > 0


def test_rows_and_modules_of_any_float_dtype():
    """A float32 module takes 16-bit rows (a bf16 aggregator's), and a module cast as a whole (``.double()``,
    ``.half()``, ``.bfloat16()``) runs in that dtype, distances in float32 at least, in eval and in training (k-means
    and the EMA update included). These raised "mat1 and mat2 must have the same dtype" and, in training, a dtype
    error of the EMA update."""
    torch.manual_seed(8)
    base = taste.ResidualVQ(**KW, kmeans_iters=3, quantize_dropout=False).train()
    x = torch.randn(120, 64)
    base(x)  # k-means-initialised
    base.eval()
    for low in (torch.bfloat16, torch.float16):
        rows = x.to(low)
        q, idx, _ = base(rows)
        want = base(rows.float())
        assert q.dtype == torch.float32 and torch.equal(idx, want[1]) and torch.equal(base.encode(rows), want[1])
    ref_q, ref_idx, _ = base(x)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        cast = copy.deepcopy(base).to(dtype)
        q, idx, loss = cast(x.to(dtype))
        assert q.dtype == dtype and torch.equal(cast.encode(x.to(dtype)), idx)
        agree = (idx == ref_idx).float().mean().item()
        assert agree == 1.0 if dtype == torch.float64 else agree > 0.9, (dtype, agree)
        sixteen = dict(atol=1e-2, rtol=1e-2) if dtype != torch.float64 else {}  # (the decode sums in 16 bits)
        torch.testing.assert_close(cast.get_output_from_indices(idx), q, **sixteen)
        twin = copy.deepcopy(base).train()
        cast.train()
        rows = x.to(dtype).requires_grad_()
        q, idx, loss = cast(rows)
        (q.float().square().mean() + loss).backward()
        assert rows.grad.dtype == dtype and rows.grad.isfinite().all()
        twin(x)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float64 else dict(atol=0.05, rtol=0.05)
        torch.testing.assert_close(cast.embed.float(), twin.embed, **tol)  # the same EMA step
        fresh = taste.ResidualVQ(**KW, kmeans_iters=3, quantize_dropout=False).to(dtype).train()
        fresh(x.to(dtype))  # k-means initialisation in that dtype
        assert fresh.initted.all() and fresh.embed.dtype == dtype and fresh.embed.isfinite().all()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("fast", [False, True])
def test_gpu_steps_make_no_host_sync(fast):
    """No device-to-host read or synchronising copy in the eval forward, the codes-only encode or a training step
    (quantizer dropout drawn on the device, forward, backward, EMA update) once the codebooks are initialised:
    torch.cuda.set_sync_debug_mode("error") raises on any."""
    torch.manual_seed(9)
    rvq = taste.ResidualVQ(**KW, kmeans_iters=3, fast=fast).cuda()
    x = torch.randn(300, 64, device="cuda")
    while not bool(rvq.initted.all()):  # k-means (reads the codebooks' state until every stage has run once)
        rvq.train()(x)  # (and every kernel compiled)

    def step():
        rows = x.clone().requires_grad_()
        q, idx, loss = rvq.train()(rows)
        (q.square().mean() + loss).backward()
        return idx

    runs = (lambda: rvq.eval()(x)[1], lambda: rvq.eval().encode(x), step)
    for run in runs:
        run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for run in runs:
            run()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _rvq_steps_on_rank(rank, out):
    """Rank r trains on half r of a batch that every rank draws alike: an EMA step with given codebooks, a
    quantizer-dropout step (each rank seeded differently) and a k-means initialisation."""
    torch.manual_seed(11)
    rows = torch.randn(2, 90, 64)
    ema = taste.ResidualVQ(**KW, kmeans_init=False, quantize_dropout=False).train()
    ema(rows[rank])
    dropout = taste.ResidualVQ(**KW, kmeans_init=False).train()
    torch.manual_seed(100 + rank)  # the depth drawn differs by rank; rank 0's must reach both
    depths = [int((dropout(rows[rank])[1] >= 0).all(0).sum()) for _ in range(6)]
    fresh = taste.ResidualVQ(**KW, kmeans_iters=4, quantize_dropout=False).train()
    fresh(rows[rank])
    return dict(ema=[ema.embed.tolist(), ema.cluster_size.tolist(), ema.embed_avg.tolist()], depths=depths,
                kmeans=fresh.embed.tolist())  # fmt: skip


def _dead_codes_on_rank(rank, out):
    """Every code dead at every step: two steps where both ranks have rows, then one where rank 0 has none."""
    torch.manual_seed(13)
    rows = torch.randn(2, 90, 64)
    rvq = taste.ResidualVQ(**KW, kmeans_init=False, quantize_dropout=False, threshold_ema_dead_code=1e6).train()
    torch.manual_seed(200 + rank)  # each rank draws other rows
    rvq(rows[rank])
    first = rvq.embed.clone()
    rvq(rows[rank])
    rvq(rows[rank] if rank == 1 else rows[rank][:0])
    return dict(first=first.tolist(), last=rvq.embed.tolist(), cluster=rvq.cluster_size.tolist())


def test_two_ranks_replace_dead_codes_alike(tmp_path):
    """Dead codes take rows of the first rank that has any, on every rank: the codebooks stay equal (each rank drew
    its own before), also when rank 0 has no rows (where drawing raised)."""
    ranks = on_two_ranks(_dead_codes_on_rank, tmp_path)
    for key in ("first", "last", "cluster"):
        assert ranks[0][key] == ranks[1][key], key
    torch.manual_seed(13)
    rows = torch.randn(2, 90, 64)
    rvq = taste.ResidualVQ(**KW, kmeans_init=False, quantize_dropout=False)  # (the ranks' weights)
    with torch.no_grad():
        stage0 = rvq.project_in(rows[0])
    first = torch.tensor(ranks[0]["first"])
    assert (first[0][:, None] == stage0[None]).all(-1).any(1).all()  # rank 0's rows after the first step
    last = torch.tensor(ranks[0]["last"])
    with torch.no_grad():
        stage0 = rvq.project_in(rows[1])
    assert (last[0][:, None] == stage0[None]).all(-1).any(1).all()  # rank 1's when rank 0 had none


def test_no_rows_with_dead_code_replacement():
    torch.manual_seed(14)
    rvq = taste.ResidualVQ(**KW, kmeans_init=False, quantize_dropout=False, threshold_ema_dead_code=1e6).train()
    rvq(torch.randn(50, 64))
    twin = copy.deepcopy(rvq)
    twin.threshold_ema_dead_code = 0.0
    _, idx, _ = rvq(torch.randn(0, 64))  # (drawing rows from none raised): the EMA step alone, no replacement
    twin(torch.randn(0, 64))
    assert idx.shape == (0, 4)
    for name in ("embed", "embed_avg", "cluster_size"):
        assert torch.equal(getattr(rvq, name), getattr(twin, name)), name


def test_two_ranks_all_reduce_the_statistics_and_share_the_dropout_depth(tmp_path):
    """Under torch.distributed (two gloo ranks on the CPU): one EMA step over the ranks' halves equals the step of
    one process over the whole batch (the statistics are all-reduced before the moving average); every rank skips
    the same stages (rank 0's depth is broadcast); k-means ends with the same codebooks on both ranks."""
    ranks = on_two_ranks(_rvq_steps_on_rank, tmp_path)
    torch.manual_seed(11)
    rows = torch.randn(2, 90, 64)
    whole = taste.ResidualVQ(**KW, kmeans_init=False, quantize_dropout=False).train()
    whole(rows.reshape(180, 64))
    want = [whole.embed, whole.cluster_size, whole.embed_avg]
    for r in ranks:
        for got, w in zip(r["ema"], want):
            torch.testing.assert_close(torch.tensor(got), w, atol=1e-5, rtol=1e-5)
    assert ranks[0]["depths"] == ranks[1]["depths"] and len(set(ranks[0]["depths"])) > 1
    assert ranks[0]["kmeans"] == ranks[1]["kmeans"]
    alone = taste.ResidualVQ(**KW, kmeans_init=False, quantize_dropout=False).train()
    alone(rows[0])
    assert not torch.allclose(alone.embed, whole.embed)  # a rank's half alone moves the codebooks elsewhere


def _kmeans_with_rows_on_rank_1_only(rank, out):
    torch.manual_seed(12)
    rows = torch.randn(90, 64)
    rvq = taste.ResidualVQ(**KW, kmeans_iters=4, quantize_dropout=False).train()
    rvq(rows if rank == 1 else rows[:0])  # rank 0 has no rows this step
    return dict(embed=rvq.embed.tolist(), cluster=rvq.cluster_size.tolist())


def test_kmeans_on_two_ranks_when_one_has_no_rows(tmp_path):
    """A rank without rows still takes part in k-means's collectives (it raised before them, and the other rank
    waited until its collective timed out): both ranks end where one process with all the rows ends."""
    ranks = on_two_ranks(_kmeans_with_rows_on_rank_1_only, tmp_path)
    torch.manual_seed(12)
    rows = torch.randn(90, 64)
    alone = taste.ResidualVQ(**KW, kmeans_iters=4, quantize_dropout=False).train()
    alone(rows)
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["embed"]), alone.embed, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.tensor(r["cluster"]), alone.cluster_size, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="at least one sample row"):
        kmeans(rows[:0], 4, 2)
