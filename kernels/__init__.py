"""Triton kernels of taste-kernels, installed as the sub-package ``taste.kernels``."""

from __future__ import annotations

import functools
import os
import sys


def _give_way_to_installed_kernels() -> None:
    """Python started in a checkout's root (``python -m``, ``python -c``, a notebook) finds this folder as the
    top-level package ``kernels``, which hides the installed package of that name (Hugging Face's, a dependency
    of transformers >= 5.25, which imports it: "cannot import name 'CUDAProperties' from 'kernels'"). Imported
    under that name, this module puts the installed package in its place, where one is installed."""
    import importlib.machinery
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(__name__, elsewhere)
    if spec is None or spec.loader is None:
        return  # nothing else is called `kernels`: this folder may stand in (its name is all a probe reads)
    module = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = module  # (an import returns what sys.modules holds once the module has run)
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _give_way_to_installed_kernels()

# Compile options that every launch passes. ``enable_fp_fusion``: multiplies and adds fused into FMAs, Triton's
# default through 3.9, which warns that 3.10 turns it off. The kernels were built, measured and checked with it on
# (the attention's exp2 scaling and the RVQ's distances ride on FMAs), so they ask for it rather than inherit it.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host's grid arithmetic. ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr
    functions since Triton 3.5: called from Python, each costs about 2 us (this CPU, Triton 3.8), against 0.03 us
    here, and a launch computes several."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as ``triton.next_power_of_2`` on the host (see :func:`cdiv`)."""
    return 1 << max(n - 1, 0).bit_length()


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA ``device`` (1 for any other device)."""
    if device.type != "cuda":
        return 1
    import torch

    return _cuda_sm_count(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache  # (launches ask; the count never changes, and torch's query re-validates the device every call)
def _cuda_sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def autotune_enabled() -> bool:
    """Large problems pick their tiles by measurement unless ``TASTE_AUTOTUNE=0``."""
    return os.environ.get("TASTE_AUTOTUNE", "1") != "0"


@functools.cache
def autotuned(kernel, tiles: tuple, names: tuple, key: tuple):
    """``kernel`` wrapped in Triton's autotuner over ``tiles``: tuples of the values of the meta-parameters
    ``names`` followed by num_warps, num_stages and optionally maxnreg (a cap on registers per thread, which lets
    more blocks share an SM). Built once per kernel; the tuner keeps its choice per ``key``
    (kernel argument names). Configs that do not fit the GPU are skipped by the tuner. Where this Triton supports
    it, the choices also go to Triton's on-disk cache for later processes on the machine to reuse (meant to avoid a
    new tuning pause and a different pick from timing noise; not yet observed on a GPU). Tiles change the
    summation order, so bit-identical results across runs and machines need ``TASTE_AUTOTUNE=0``."""
    import inspect

    import triton

    configs = []
    for t in tiles:
        num_warps, num_stages, *maxnreg = t[len(names) :]
        configs.append(triton.Config(dict(zip(names, t)), num_warps=num_warps, num_stages=num_stages,
                                     maxnreg=maxnreg[0] if maxnreg else None))  # fmt: skip
    extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    tuner = triton.autotune(configs, key=list(key), **extra)(kernel)
    _record_timings(tuner)
    return tuner


def _record_timings(tuner) -> None:
    """Keeps every tuning's per-config times, by key (Triton keeps only the last tuning's, in ``configs_timings``):
    a tuning adds its key to ``tuner.cache`` (last, a dict keeps insertion order) and sets ``configs_timings``,
    measured or read from the on-disk cache."""
    tuner.taste_timings = {}

    def recording_run(*args, **kwargs):
        known = len(tuner.cache)
        tuner.configs_timings = None  # a key settled without timing (one config left) must not take older times
        out = type(tuner).run(tuner, *args, **kwargs)  # looked up per launch: bench/compile_kernels.py patches it
        if len(tuner.cache) > known and getattr(tuner, "configs_timings", None):
            times = {}
            for config, t in tuner.configs_timings.items():  # t: [median, p20, p80] ms, or one number
                times[str(config)] = float(t[0] if isinstance(t, (list, tuple)) else t)
            tuner.taste_timings[str(next(reversed(tuner.cache)))] = times
        return out

    tuner.run = recording_run  # KernelInterface.__getitem__ launches through self.run


# The launch keywords of the configuration each tuner settled on (compile options included), by (tuner, the launch
# site's key): see launch_tuned.
_SETTLED: dict = {}


def launch_tuned(tuner, key: tuple, grid, *args, **kwargs) -> None:
    """Launches ``tuner`` (from :func:`autotuned`) on ``grid``; once it has settled on a configuration for ``key``,
    later launches with that key go straight to the kernel with that configuration.

    Triton's ``Autotuner.run`` rebuilds its key from every argument (and the dtype of every tensor) at each launch
    and copies the configuration's arguments: 11-19 us of host time per launch on a CPU where the kernel launch
    itself starts in 2-3 us (`bench/RESULTS.md`). ``key`` must hold everything that decides the tuner's own key
    (its key arguments' values and the tensors' dtypes) and the device; the same key then means the same choice.
    A tuner run that settles nothing (``bench/compile_kernels.py`` compiles every candidate instead) is not kept."""
    settled = _SETTLED.get((tuner, key))
    if settled is not None:
        tuner.fn[grid](*args, **kwargs, **settled)
        return
    tuner.best_config = None
    tuner[grid](*args, **kwargs, **COMPILE_OPTIONS)
    if tuner.best_config is not None:
        _SETTLED[(tuner, key)] = {**tuner.best_config.all_kwargs(), **COMPILE_OPTIONS}


# Launch sites' tiles that fit, by (site, device, what shapes the build): an index into the site's list of tiles.
_FITTING: dict = {}


def launch_fitting(launch, tiles: list[dict], key: tuple) -> dict:
    """Calls ``launch(tile)`` with the first of ``tiles`` (the meta-parameters of one launch, fixed tiles first,
    then smaller ones) whose build this GPU can load, and returns that tile.

    Triton raises ``OutOfResources`` before anything runs when a build needs more shared memory than the GPU gives a
    block: 227 KB on Hopper and Blackwell data-centre GPUs, 163 KB on A100, 99 KB on Ada and consumer Blackwell, 64 KB
    on Turing. Then the next tile is tried. The choice is kept per ``key``, which must name the launch site, the
    device and everything that changes the build besides the tile (dtype, head dim, flags), and per first tile."""
    if not tiles:
        raise ValueError("launch_fitting: no tiles given")
    key = (key, tuple(sorted(tiles[0].items())))
    first = _FITTING.get(key, 0)
    for i in range(first, len(tiles)):
        try:
            launch(tiles[i])
        except _out_of_resources():  # (evaluated only when something is raised: no import on the launch path)
            if i + 1 == len(tiles):
                raise
            continue
        _FITTING[key] = i
        return tiles[i]
    raise AssertionError("unreachable: the last tile either launched or raised")


@functools.cache
def _out_of_resources() -> type:
    from triton.runtime.errors import OutOfResources

    return OutOfResources


def shrinking(tile: dict, minimum: dict) -> list[dict]:
    """``tile`` and smaller versions of it, for :func:`launch_fitting`: one pipeline stage instead of two or more,
    then each block named in ``minimum`` halved in turn (down to its minimum, a power of two)."""
    out = [dict(tile)]
    if tile.get("num_stages", 1) > 1:
        out.append({**out[-1], "num_stages": 1})
    for name, floor in minimum.items():
        while out[-1][name] > floor:
            out.append({**out[-1], name: out[-1][name] // 2})
    return out


def tuned_choices(kernel_tuner) -> dict[str, str]:
    """What a tuner from :func:`autotuned` picked so far, by key: for benchmark reports."""
    return {str(k): str(c) for k, c in getattr(kernel_tuner, "cache", {}).items()}


def tuning_timings(kernel_tuner) -> dict[str, dict[str, float]]:
    """Median milliseconds of every candidate config at each tuning of a tuner from :func:`autotuned`, by key
    (inf: the config did not fit the GPU): the whole landscape behind :func:`tuned_choices`, for reports."""
    return {k: dict(v) for k, v in getattr(kernel_tuner, "taste_timings", {}).items()}
