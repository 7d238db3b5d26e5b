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


def _no_cuda_build_expected() -> str | None:
    """Why setup.py builds no CUDA kernels here, or None when it must build them."""
    if torch.version.cuda is None:
        return "torch is a CPU build: no CUDA kernels to compile"
    if os.environ.get("TASTE_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "CUDA build skipped (TASTE_SKIP_CUDA_BUILD)"
    setup = _setup_module()
    toolkit = setup.find_cuda_home(torch.version.cuda)
    # A toolkit of another major CUDA version than torch's is not used (test_toolkit_of_another_major_...). No
    # toolkit at all is no reason: the tests then fail, as a CUDA machine or CI is expected to have one.
    return toolkit and setup.toolkit_mismatch(toolkit, torch.version.cuda)


def test_cuda_kernels_are_compiled_in():
    if reason := _no_cuda_build_expected():
        pytest.skip(reason)
    assert ops.CUDA_ARCH_LIST is not None, "taste._C has no CUDA kernels: was a CUDA toolkit found at build time?"
    missing = [n for n in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"taste::{n}", "CUDA")]
    assert not missing, f"ops without a CUDA kernel: {missing}"


def test_cuda_arch_list_is_recorded():
    if reason := _no_cuda_build_expected():
        pytest.skip(reason)
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
    monkeypatch.setattr(ops, "CUDA_ARCH_LIST", None)  # built without CUDA kernels: no arch list would help
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "TORCH_CUDA_ARCH_LIST" not in text
    assert "gpu 1: NVIDIA H100, compute capability 9.0, extension has code for it: no, the build has no CUDA " \
        "kernels: the ops run their PyTorch references on it" in text  # fmt: skip


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


def _fake_toolkit(root, version: int | None) -> str:
    for sub in ("bin", "include"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for rel in (("bin", "nvcc"), ("include", "cuda_runtime.h")):
        open(os.path.join(root, *rel), "w").close()
    if version is not None:
        with open(os.path.join(root, "include", "cuda.h"), "w") as f:
            f.write(f"#ifndef CUDA_H\n#define CUDA_VERSION {version}\n#endif\n")
    return str(root)


def test_toolkit_of_another_major_version_than_torch_is_not_used(tmp_path, monkeypatch):
    """torch refuses to build with a toolkit of another major CUDA version (e.g. torch cu121, nvcc 13.0): setup.py
    looks for one of torch's version, and without one builds the CPU kernels only, saying why, instead of
    failing the install."""
    setup = _setup_module()
    cuda13 = _fake_toolkit(tmp_path / "cuda-13.0", 13000)
    cuda12 = _fake_toolkit(tmp_path / "cuda-12.4", 12040)
    unknown = _fake_toolkit(tmp_path / "cuda-x", None)
    assert setup.toolkit_cuda_version(cuda12) == (12, 4) and setup.toolkit_cuda_version(cuda13) == (13, 0)
    assert setup.toolkit_cuda_version(unknown) is None
    assert setup.toolkit_mismatch(cuda12, "12.1") is None
    assert setup.toolkit_mismatch(cuda13, "12.1") == f"the CUDA toolkit at {cuda13} is CUDA 13.0 but torch was built " \
        "with CUDA 12.1"  # fmt: skip
    assert setup.toolkit_mismatch(unknown, "12.1") is None  # unknown: torch's own check decides
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(setup, "_toolkit_candidates", lambda: [cuda13, str(tmp_path / "none"), cuda12])
    assert setup.find_cuda_home("12.1") == cuda12  # the first of torch's major version
    assert setup.find_cuda_home("13.0") == cuda13
    assert setup.find_cuda_home("11.8") == cuda13  # none matches: the first (the build then reports the mismatch)
    monkeypatch.setenv("CUDA_HOME", cuda13)
    assert setup.find_cuda_home("12.1") == cuda13  # the user's choice stands


def test_every_op_has_a_cuda_kernel_in_every_build():
    """Compiled, or (an extension built without CUDA kernels) the reference: never torch's "Could not run
    'taste::pack' with arguments from the 'CUDA' backend"."""
    if not taste.HAS_EXTENSION:
        pytest.skip("no compiled extension: taste.ops calls the references directly on every device")
    assert set(ops.COMPILED_OPS) == set(OPS)
    missing = [n for n in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"taste::{n}", "CUDA")]
    assert not missing, missing


def test_references_serve_cuda_tensors_without_cuda_kernels():
    """What an extension without CUDA kernels registers at import (registered here over the compiled CUDA kernels,
    in a subprocess, where the build has them), with the CUDA dispatch key called on CPU tensors: the references'
    results, their argument checks, and one warning that says how to build the kernels."""
    script = textwrap.dedent(
        """
        import warnings
        import torch
        import taste
        from taste import ops, reference
        if ops.CUDA_ARCH_LIST is not None:  # (without CUDA kernels the import registered them already)
            lib = torch.library.Library("taste", "IMPL")
            ops.register_references_on_cuda(lib)
        cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
        def on_cuda(name, *args):
            return getattr(torch.ops.taste, name).default.redispatch(cuda, *args)
        x, off = torch.randn(7, 3), torch.tensor([0, 2, 2, 7], dtype=torch.int32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert torch.equal(on_cuda("segment_sum", x, off), reference.segment_sum(x, off))
            packed, cu = on_cuda("pack", torch.arange(8.0).view(2, 4), torch.tensor([1, 3]))
            assert packed.tolist() == [0.0, 4.0, 5.0, 6.0] and cu.tolist() == [0, 1, 4]
            cu_out, ids, _, rows = on_cuda("prefix_layout", torch.tensor([5, 6, 7, 8]), cu, torch.tensor([9]))
            assert ids.tolist() == [9, 5, 9, 6, 7, 8] and rows.tolist() == [1, 3, 4, 5]
            try:
                on_cuda("segment_mean", x, torch.tensor([0, 3, 2, 7], dtype=torch.int32))
                raise AssertionError("bad offsets were accepted")
            except RuntimeError as e:
                assert "offsets must be non-decreasing" in str(e), e
        notes = [str(w.message) for w in caught if "built without CUDA kernels" in str(w.message)]
        assert len(notes) == 1, notes
        if torch.version.cuda:  # what to install and how to rebuild
            assert f"torch's CUDA {torch.version.cuda}" in notes[0] and "--no-build-isolation" in notes[0], notes
        else:  # a ROCm or CPU-only torch: nothing to rebuild with
            assert "torch is not a CUDA build" in notes[0] and "CUDA_HOME" not in notes[0], notes
        print("ok")
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(taste.__file__)), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd="/")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_a_checkout_root_does_not_hide_an_installed_kernels_package(tmp_path):
    """Python started in the repository's root finds ``kernels/`` as the top-level package ``kernels``; Hugging
    Face's package of that name (a transformers >= 5.25 dependency, imported by it) must still be what
    ``import kernels`` gives. Here a stand-in package on the path plays it; without one the folder stays."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "kernels", "__init__.py")):
        pytest.skip("not a source checkout")
    installed = tmp_path / "site" / "kernels"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("CUDAProperties = 'the installed one'\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    script = "import kernels; print(kernels.CUDAProperties)"
    # -S: no site-packages (the real package may be installed there); the root comes first on the path (cwd).
    done = subprocess.run([sys.executable, "-S", "-c", script], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "the installed one", done.stderr
    alone = subprocess.run([sys.executable, "-S", "-c", "import kernels; print(kernels.__file__)"], cwd=root,
                           env={**os.environ, "PYTHONPATH": ""}, capture_output=True, text=True)  # fmt: skip
    assert alone.returncode == 0 and alone.stdout.strip() == os.path.join(root, "kernels", "__init__.py"), alone.stderr
