"""Build of taste-kernels: the Python package `taste` plus its compiled op library `taste._C`.

The C++ CPU kernels are always compiled. The CUDA kernels (csrc/cuda/*.cu) are compiled whenever the installed
torch is a CUDA build and a CUDA toolkit of torch's CUDA major version is found, GPU present or not; otherwise the
build says why, and on CUDA tensors the ops run their PyTorch references (taste.ops.register_references_on_cuda).
Environment:

- TASTE_SKIP_CUDA_BUILD=1: compile the CPU kernels only.
- TORCH_CUDA_ARCH_LIST: GPU architectures. Default: those of the GPUs this machine shows, with PTX for the newest
  (later GPUs compile it when loading); with no GPU, "9.0+PTX" (Hopper, and PTX for Blackwell and later). The
  library records the list (taste.ops.CUDA_ARCH_LIST) and names it when it meets a GPU it has no code for.
- MAX_JOBS: parallel compile jobs (ninja).
- CUDA_HOME / CUDA_PATH: the toolkit, when it is not found by itself (see find_cuda_home).
"""

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit(path):
    return bool(path) and all(
        os.path.isfile(os.path.join(path, *p)) for p in (("bin", "nvcc"), ("include", "cuda_runtime.h"))
    )


def _nvcc_wrapper_target(nvcc):
    """The toolkit behind an nvcc that is a shell wrapper (`exec /opt/cuda-X/bin/nvcc "$@"`), if any."""
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    match = re.search(rb"(/\S+)/bin/nvcc\b", head)
    return match.group(1).decode() if match else None


def find_cuda_home(torch_cuda=None):
    """Locate a usable CUDA toolkit (bin/nvcc and include/cuda_runtime.h), or None.

    torch guesses the toolkit from the directory of the first `nvcc` on PATH; where that nvcc is a wrapper
    script (e.g. /usr/local/bin/nvcc) the guess is /usr/local, which has no CUDA libraries, and linking fails.
    So check, in order: CUDA_HOME / CUDA_PATH, /usr/local/cuda, the target of an nvcc wrapper, the real
    directory of nvcc, then /usr/local/cuda-* (newest first). Among the toolkits found after CUDA_HOME / CUDA_PATH,
    the first of torch's CUDA major version ``torch_cuda`` ("12.1") wins, else the first one.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path:
            if _is_toolkit(path):
                return path
            print(
                f"taste setup: {var}={path} is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h); "
                "looking elsewhere",
                file=sys.stderr,
            )
    toolkits = [c for c in _toolkit_candidates() if _is_toolkit(c)]
    return next((c for c in toolkits if not toolkit_mismatch(c, torch_cuda)), toolkits[0] if toolkits else None)


def _toolkit_candidates():
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [_nvcc_wrapper_target(nvcc), os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    return candidates + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)


def toolkit_cuda_version(cuda_home):
    """(major, minor) of the CUDA toolkit at ``cuda_home``, from CUDA_VERSION in include/cuda.h (13000 is 13.0), or
    None where that cannot be read."""
    try:
        with open(os.path.join(cuda_home, "include", "cuda.h")) as f:
            match = re.search(r"^#define\s+CUDA_VERSION\s+(\d+)", f.read(), re.MULTILINE)
    except OSError:
        return None
    if not match:
        return None
    value = int(match.group(1))
    return value // 1000, value % 1000 // 10


def toolkit_mismatch(cuda_home, torch_cuda):
    """Why the toolkit at ``cuda_home`` cannot build kernels for a torch built with CUDA ``torch_cuda`` ("12.1"), or
    None when it can (or its version is unknown: then torch's own check decides). torch refuses a toolkit of
    another major version at build time; minor versions of one major are compatible."""
    found = toolkit_cuda_version(cuda_home)
    if found is None or not torch_cuda or str(found[0]) == torch_cuda.split(".")[0]:
        return None
    return f"the CUDA toolkit at {cuda_home} is CUDA {found[0]}.{found[1]} but torch was built with CUDA {torch_cuda}"


def pip_cuda_include_dirs(cuda_home):
    """Header folders of the nvidia-* wheels that a CUDA build of torch depends on, when the toolkit lacks them.

    torch's CUDA headers include cusparse.h, cublas_v2.h, ...; a toolkit installed without its math libraries
    (compiler and runtime only) has none of them, while the wheels that torch installs ship them. They are
    added with -isystem, so that they come after the toolkit's own headers.
    """
    if os.path.isfile(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(
        os.path.dirname(h)
        for root in nvidia.__path__
        for h in glob.glob(os.path.join(root, "*", "include", "cusparse.h"))
    )


def default_cuda_arch_list(capabilities):
    """TORCH_CUDA_ARCH_LIST for GPUs of these compute capabilities ((major, minor) pairs): each once, oldest first,
    with PTX for the newest so that a later architecture can compile it when loading; "9.0+PTX" for none."""
    archs = [f"{major}.{minor}" for major, minor in sorted(set(capabilities))] or ["9.0"]
    archs[-1] += "+PTX"
    return ";".join(archs)


def cuda_arch_list(torch):
    """TORCH_CUDA_ARCH_LIST as set in the environment, else the default for the GPUs that torch sees here."""
    given = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if given:
        return given
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return default_cuda_arch_list(torch.cuda.get_device_capability(i) for i in range(visible))


def arch_list_define(arch_list):
    """The list as a preprocessor value that needs no quoting in a compiler command: separators become commas."""
    value = ",".join(re.split(r"[;\s,]+", arch_list.strip()))
    if not re.fullmatch(r"[0-9A-Za-z.+,]+", value):
        raise SystemExit(f"taste setup: TORCH_CUDA_ARCH_LIST={arch_list!r} is not a list like '8.0;9.0+PTX'")
    return value


def _truthy(name):
    return os.environ.get(name, "").strip() not in ("", "0", "false", "False", "no")


def build_extensions():
    try:
        import torch
    except ImportError:
        sys.exit(
            "taste-kernels: PyTorch is needed to build the extension but `import torch` failed.\n"
            "Install torch first (pip install torch) and build with `pip install --no-build-isolation .`,\n"
            "or use plain `pip install .`, whose isolated build environment installs torch itself."
        )
    cuda_home = None
    want_cuda = torch.version.cuda is not None and not _truthy("TASTE_SKIP_CUDA_BUILD")
    if want_cuda:
        cuda_home = find_cuda_home(torch.version.cuda)
        mismatch = cuda_home and toolkit_mismatch(cuda_home, torch.version.cuda)
        if cuda_home is None or mismatch:
            reason = mismatch or "torch is a CUDA build but no CUDA toolkit was found"
            cuda_major = torch.version.cuda.split(".")[0]
            print(
                f"taste setup: {reason}; building the CPU kernels only. On CUDA tensors the alignment ops will run "
                "their PyTorch references (the Triton kernels are not affected). To compile the CUDA kernels, set "
                f"CUDA_HOME to a CUDA {cuda_major}.x toolkit and rebuild.",
                file=sys.stderr,
            )
            cuda_home = None
        else:
            # cpp_extension reads CUDA_HOME when it is imported, so it must be set before the import below.
            os.environ["CUDA_HOME"] = cuda_home
            os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(torch)
    from torch.utils import cpp_extension

    with_cuda = cuda_home is not None
    sources = ["csrc/ops.cpp", "csrc/common.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # at::parallel_for expands to `#pragma omp parallel` in torch's headers: without -fopenmp it runs serially.
    cxx = ["-O3", "-fopenmp"]
    ext_cls = cpp_extension.CppExtension
    kwargs = {}
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext_cls = cpp_extension.CUDAExtension
        archs = f"-DTASTE_CUDA_ARCHS={arch_list_define(os.environ['TORCH_CUDA_ARCH_LIST'])}"
        cxx += ["-DWITH_CUDA", archs]
        nvcc = ["-O3", "-DWITH_CUDA", archs, "--expt-relaxed-constexpr"]
        for inc in pip_cuda_include_dirs(cuda_home):
            cxx += ["-isystem", inc]
            nvcc += ["-isystem", inc]
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": nvcc}
        print(
            f"taste setup: compiling CUDA kernels with {cuda_home} for TORCH_CUDA_ARCH_LIST="
            f"{os.environ['TORCH_CUDA_ARCH_LIST']}",
            file=sys.stderr,
        )
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
    ext = ext_cls("taste._C", sources, extra_link_args=["-fopenmp"], **kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


if __name__ == "__main__":  # setuptools runs this file as __main__; the tests import it for its functions
    ext_modules, cmdclass = build_extensions()
    setup(
        packages=find_packages(include=["taste", "taste.*"]) + ["taste.kernels"],
        package_dir={"taste.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
