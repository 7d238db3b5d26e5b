"""taste._dispatch: eager calls skip the custom ops' dispatch only where it would add nothing, with the same results."""

import pytest
import torch
from conftest import DEVICES, make_cu
from torch.utils._python_dispatch import TorchDispatchMode

from taste import _dispatch, ops, ops_attention, ops_rvq


def attention_args(gen, requires_grad=False):
    q = torch.randn(9, 2, 32, generator=gen, requires_grad=requires_grad)
    k = torch.randn(14, 2, 32, generator=gen)
    return q, k, torch.randn(14, 2, 32, generator=gen), make_cu([4, 5]), make_cu([6, 8]), 5, 8


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls that go through the attention, cross-attention and RVQ custom ops."""
    calls = []

    def counting(name, op):
        def call(*args):
            calls.append(name)
            return op(*args)

        monkeypatch.setattr(module, name, call)

    for module, name in ((ops_attention, "_attention"), (ops_attention, "_cross_attention"),
                         (ops_rvq, "_rvq_encode"), (ops_rvq, "_rvq_decode")):  # fmt: skip
        counting(name, getattr(module, name))
    return calls


@pytest.mark.parametrize("device", DEVICES)
def test_direct_calls_give_the_ops_results(device, gen, monkeypatch):
    q, k, v, cu_q, cu_k, max_q, max_k = (t.to(device) if torch.is_tensor(t) else t for t in attention_args(gen))
    h = torch.randn(2, 7, 16, generator=gen).to(device)
    w = torch.randn(64, 16, generator=gen).to(device)
    x, books = torch.randn(10, 8, generator=gen).to(device), torch.randn(3, 16, 8, generator=gen).to(device)
    codes = torch.tensor([[0, 3, -1]], device=device)

    def run():
        with torch.no_grad():
            return (ops.text_query_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=True),
                    ops.text_query_cross_attention(q, h, h, w, w, cu_q, max_q, chunk_size=1),
                    *ops.rvq_encode(x, books), ops.rvq_decode(codes, books))  # fmt: skip

    direct = run()
    monkeypatch.setattr(_dispatch, "ENABLED", False)  # TASTE_DIRECT_CALLS=0
    for a, b in zip(direct, run(), strict=True):
        assert torch.equal(a, b)


def test_no_gradient_to_record_calls_the_kernel_directly(gen, op_calls):
    q, k, v, *rest = attention_args(gen)
    with torch.no_grad():
        ops.text_query_attention(q, k, v, *rest)
        ops.rvq_encode(torch.randn(4, 8), torch.randn(2, 16, 8))
        ops.rvq_decode(torch.tensor([[0, 1]]), torch.randn(2, 16, 8))
    ops.text_query_attention(q, k, v, *rest)  # grad mode on, but no input requires a gradient
    with torch.inference_mode():
        ops.text_query_attention(q, k, v, *rest)
    assert op_calls == []


def test_a_gradient_to_record_goes_through_the_op(gen, op_calls):
    q, k, v, *rest = attention_args(gen, requires_grad=True)
    ops.text_query_attention(q, k, v, *rest).sum().backward()
    assert op_calls == ["_attention"] and q.grad is not None
    x = torch.randn(4, 8, requires_grad=True)
    ops.rvq_quantize(x, torch.randn(2, 16, 8)).commit_loss.backward()
    assert op_calls[1] == "_rvq_encode" and x.grad is not None  # (its backward decodes through the op too)


class PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "context",
    ["dispatch mode", "device context", "profiler", "disabled"],
)
def test_modes_profilers_and_the_switch_go_through_the_op(context, gen, op_calls, monkeypatch):
    q, k, v, *rest = attention_args(gen)
    if context == "disabled":
        monkeypatch.setattr(_dispatch, "ENABLED", False)
    managers = {
        "dispatch mode": PassThrough,
        "device context": lambda: torch.device("cpu"),
        "profiler": lambda: torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]),
        "disabled": torch.no_grad,
    }
    with torch.no_grad(), managers[context]():
        ops.text_query_attention(q, k, v, *rest)
    assert op_calls == ["_attention"]


def test_fake_tensors_and_subclasses_go_through_the_op(gen, op_calls):
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, *rest = attention_args(gen)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        assert ops.text_query_attention(fq, fk, fv, *rest).shape == q.shape
    assert op_calls == ["_attention"]
    assert not _dispatch.direct_call_ok(torch.nn.Buffer(q).as_subclass(Sub))
    assert _dispatch.direct_call_ok(torch.nn.Parameter(q, requires_grad=False), None, k)


class Sub(torch.Tensor):
    pass


def test_functorch_transforms_and_forward_ad_go_through_the_op():
    seen = []

    def f(x):
        seen.append(_dispatch.direct_call_ok(x))
        return x.sum()

    torch.func.grad(f)(torch.ones(3))
    with torch.autograd.forward_ad.dual_level():  # forward-mode AD: the op says it has no rule, never a silent drop
        f(torch.autograd.forward_ad.make_dual(torch.ones(3), torch.ones(3)))
    with torch.no_grad():
        torch.vmap(lambda x: seen.append(_dispatch.direct_call_ok(x)) or x)(torch.ones(2, 3))
    assert seen == [False, False, False] and _dispatch.direct_call_ok(torch.ones(3))


def test_compiled_graphs_keep_the_op(gen):
    q, k, v, *rest = attention_args(gen)
    targets = []

    def backend(gm, example_inputs):
        targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm

    with torch.no_grad():
        out = torch.compile(lambda *a: ops.text_query_attention(*a), backend=backend, fullgraph=True)(q, k, v, *rest)
        torch.testing.assert_close(out, ops.text_query_attention(q, k, v, *rest))
    assert torch.ops.taste.text_query_attention.default in targets
