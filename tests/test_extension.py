"""The compiled extension: loaded, CUDA kernels compiled in when torch has CUDA, and the fallback without it."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import taste
from taste import ops

OPS = [
    "pack",
    "pack_offsets",
    "unpack",
    "word_offsets",
    "segment_sum",
    "segment_mean",
    "segment_broadcast",
    "segment_mean_broadcast",
    "segment_sum_by_key",
    "delay_layout",
    "prefix_layout",
]


def test_extension_is_loaded():
    assert taste.HAS_EXTENSION, "taste._C did not load: the build is broken"
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"taste::{name}", "CPU"), name


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU build: no CUDA kernels to compile")
@pytest.mark.skipif(os.environ.get("TASTE_SKIP_CUDA_BUILD", "0") not in ("", "0"), reason="CUDA build skipped")
def test_cuda_kernels_are_compiled_in():
    missing = [n for n in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"taste::{n}", "CUDA")]
    assert not missing, f"ops without a CUDA kernel: {missing} (was a CUDA toolkit found at build time?)"


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU build: no CUDA kernels to compile")
@pytest.mark.skipif(os.environ.get("TASTE_SKIP_CUDA_BUILD", "0") not in ("", "0"), reason="CUDA build skipped")
def test_cuda_arch_list_is_recorded():
    # What the build compiled for: the error on a GPU without code in the library names it.
    assert ops.CUDA_ARCH_LIST is not None and re.fullmatch(r"[0-9A-Za-z.+]+(,[0-9A-Za-z.+]+)*", ops.CUDA_ARCH_LIST)
    assert ops.CUDA_ARCH_LIST != "unknown", "setup.py passed no TASTE_CUDA_ARCHS"
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        assert ops.CUDA_ARCH_LIST == "9.0+PTX"  # the default of a build on a machine without a GPU


@pytest.mark.parametrize(
    "arch_list, capability, covered",
    [
        ("9.0+PTX", (9, 0), True),
        ("9.0+PTX", (10, 0), True),  # PTX: compiled for the newer GPU when loading
        ("9.0+PTX", (12, 0), True),
        ("9.0+PTX", (8, 0), False),  # nothing for an older GPU
        ("9.0", (10, 0), False),  # a cubin does not cross major versions
        ("8.0", (8, 6), True),  # ... but runs on later minors of its own
        ("8.6", (8, 0), False),
        ("8.0;9.0+PTX", (8, 9), True),
        ("8.0 9.0", (8, 9), True),
        ("9.0a", (9, 0), True),  # architecture-specific: that architecture only
        ("9.0a+PTX", (10, 0), False),
        ("10.0f", (10, 3), True),  # family build
        ("Hopper", (9, 0), None),  # a name this cannot read
        ("Hopper;9.0", (9, 0), True),
        ("", (9, 0), False),
    ],
)
def test_cuda_arch_covers(arch_list, capability, covered):
    assert ops.cuda_arch_covers(capability, arch_list) is covered


def test_info_command_names_each_gpu_and_whether_the_extension_runs_there(monkeypatch, capsys):
    from taste.cli import main

    monkeypatch.setattr(ops, "CUDA_ARCH_LIST", "9.0+PTX")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(8, 0), (9, 0)][i])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: ["NVIDIA A100", "NVIDIA H100"][i])
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__ and info["extension"] == taste.HAS_EXTENSION
    assert [(g["name"], g["capability"], g["extension_has_code"]) for g in info["gpus"]] == [
        ("NVIDIA A100", "8.0", False),
        ("NVIDIA H100", "9.0", True),
    ]
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "gpu 0: NVIDIA A100, compute capability 8.0, extension has code for it: NO" in text
    assert "TORCH_CUDA_ARCH_LIST=8.0" in text


def _setup_module():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    spec = importlib.util.spec_from_file_location("taste_setup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the functions, builds nothing
    return module


def test_default_cuda_arch_list():
    setup = _setup_module()
    assert setup.default_cuda_arch_list([]) == "9.0+PTX"
    assert setup.default_cuda_arch_list([(8, 0)]) == "8.0+PTX"
    # Several GPUs: each architecture once, oldest first, PTX only for the newest.
    assert setup.default_cuda_arch_list([(9, 0), (8, 6), (9, 0)]) == "8.6;9.0+PTX"
    assert setup.arch_list_define("8.0;9.0+PTX") == "8.0,9.0+PTX"
    assert setup.arch_list_define(" 8.6 9.0a ") == "8.6,9.0a"
    with pytest.raises(SystemExit, match="TORCH_CUDA_ARCH_LIST"):
        setup.arch_list_define("9.0; rm -rf /")


def test_cuda_arch_list_from_environment(monkeypatch):
    setup = _setup_module()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.9")
    assert setup.cuda_arch_list(torch) == "8.9"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(8, 0), (9, 0)][i])
    assert setup.cuda_arch_list(torch) == "8.0;9.0+PTX"


def test_fallback_to_reference_without_extension():
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["taste._C"] = None  # makes `from taste import _C` fail as in a source checkout
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import taste
            from taste import ops
        assert not taste.HAS_EXTENSION
        assert sum("falls back" in str(w.message) for w in caught) == 1, [str(w.message) for w in caught]
        import torch
        packed, cu = ops.pack(torch.arange(6.0).view(2, 3), torch.tensor([2, 1]))
        assert packed.tolist() == [0.0, 1.0, 3.0] and cu.tolist() == [0, 2, 3]
        offsets = ops.word_offsets(torch.tensor([0, 0, 0]), cu)
        assert offsets.tolist() == [0, 2, 3]
        assert ops.segment_mean(packed, offsets).tolist() == [0.5, 3.0]
        layout = ops.prefix_layout(torch.tensor([5, 6, 7]), cu, torch.tensor([9]))
        assert layout.ids.tolist() == [9, 5, 6, 9, 7] and layout.token_rows.tolist() == [1, 2, 4]
        print("ok")
        """
    )
    env = dict(os.environ)
    # The same `taste` as this test run uses, installed or a source checkout with an in-place build.
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(taste.__file__)), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd="/")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_package_is_marked_typed():
    """PEP 561: the installed package carries py.typed, so type checkers use its annotations."""
    assert os.path.isfile(os.path.join(os.path.dirname(taste.__file__), "py.typed"))


def test_ops_have_docstrings_with_shapes():
    for name in OPS:
        doc = getattr(ops, name).__doc__
        assert doc and "(" in doc, name
