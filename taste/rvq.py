"""``taste.ResidualVQ``: a drop-in for the official (vector-quantize-pytorch) ResidualVQ of TASTE (spec 1.6), on
packed rows, with the fused kernels of :mod:`taste.ops_rvq`.

State: ``embed (Q, K, d)`` codebooks, ``embed_avg (Q, K, d)`` and ``cluster_size (Q, K)`` EMA statistics,
``initted (Q,)``, all float32 buffers (the codebooks are learnt by EMA, not by gradient). The official /
vector-quantize-pytorch keys ``layers.{i}._codebook.{embed,embed_avg,cluster_size,initted}`` (with a leading
dimension of 1) are stacked into these on load, and its unused ``mlps.*`` keys are dropped; ``project_in`` and
``project_out`` keep their names.
"""

from __future__ import annotations

import hashlib
import inspect
import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn

from taste.ops import rvq_decode, rvq_encode, rvq_quantize, segment_sum_by_key
from taste.ops_rvq import ema_statistics_and_inputs

OFFICIAL_PREFIX = "audio_tower.vq.rvq."
_BUFFERS = ("embed", "embed_avg", "cluster_size", "initted")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def kmeans(
    samples: Tensor, num_clusters: int, iters: int, *, fast: bool = False, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on ``(n, d)`` float32 rows -> ``(centroids (k, d), counts (k,))``.

    Initial centroids are a random sample of rows (with replacement when ``n < k``); an empty cluster keeps its
    centroid. The assignment step is the fused RVQ encoder with one stage (the (n, k) distances never touch
    memory), the update a deterministic segment sum. Under ``torch.distributed`` every rank starts from the sample
    of the first rank that has rows (a rank may have none) and the sums and counts are all-reduced, so all ranks end
    with the same centroids.
    """
    n, k, dev = samples.shape[0], num_clusters, samples.device
    distributed = _distributed()
    source = 0
    if distributed:  # every rank takes part in the collectives below, rows or not (else the others would wait)
        first = torch.tensor(dist.get_rank() if n else dist.get_world_size(), device=dev)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        source = int(first)
    if n == 0 and (not distributed or source == dist.get_world_size()):
        raise ValueError("k-means needs at least one sample row" + (" on some rank" if distributed else ""))
    if n == 0:
        means = samples.new_zeros(k, samples.shape[1])  # (rank `source`'s sample arrives below)
    elif n >= k:
        means = samples[torch.randperm(n, generator=generator, device="cpu")[:k].to(dev)]
    else:
        means = samples[torch.randint(0, n, (k,), generator=generator, device="cpu").to(dev)]
    if distributed:
        dist.broadcast(means, src=source)
    counts = torch.zeros(k, device=dev)
    for _ in range(iters):
        idx, _ = rvq_encode(samples, means[None], fast=fast)
        sums, counts = segment_sum_by_key(samples, idx[:, 0], k)
        counts = counts.to(samples.dtype)
        if distributed:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        means = torch.where((counts > 0)[:, None], sums / counts.clamp(min=1)[:, None], means)
    return means, counts


def _float32_at_least(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _eager_only(fn):
    """torch.compile runs ``fn`` outside the graph (a graph break; with ``fullgraph=True`` an error naming why)."""
    why = (
        "ResidualVQ's k-means initialisation reads the codebooks' state on the host, in the first training steps "
        "(until every stage has run once): train until `initted.all()` before compiling with fullgraph=True, or "
        "load initialised codebooks"
    )
    if "reason" in inspect.signature(torch.compiler.disable).parameters:  # (older torch has no reason)
        return torch.compiler.disable(fn, reason=why)
    return torch.compiler.disable(fn)


def _loaded(module: ResidualVQ, incompatible_keys) -> None:
    """After a load: whether every stage is initialised (one read-back, at load time rather than at a step)."""
    module._initted_seen = not module.initted.is_meta and bool(module.initted.all())


class ResidualVQ(nn.Module):
    """Residual VQ with EMA codebooks, k-means initialisation and quantizer dropout.

    Args (keyword-only): dim (input/output width, 1280 in TASTE), codebook_dim (256), num_quantizers (4),
    codebook_size (512), decay (0.99), eps (1e-5, Laplace smoothing), kmeans_init (True), kmeans_iters (100),
    quantize_dropout (True), threshold_ema_dead_code (0 = no dead-code replacement), commitment_weight (1.0),
    fast (False: exact float32 distances; True: tf32 products on CUDA).
    """

    _initted_seen = False  # (instances set their own; a module pickled before it existed reads the buffer once)
    _told_uninitialised = False  # whether the warning of _check_initialised was given (once per module)

    def __init__(
        self,
        *,
        dim: int = 1280,
        codebook_dim: int = 256,
        num_quantizers: int = 4,
        codebook_size: int = 512,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 100,
        quantize_dropout: bool = True,
        threshold_ema_dead_code: float = 0.0,
        commitment_weight: float = 1.0,
        fast: bool = False,
    ):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if min(dim, codebook_dim, num_quantizers, codebook_size) < 1:
            raise ValueError("dim, codebook_dim, num_quantizers and codebook_size must be positive")
        if not eps > 0:  # (the smoothed count of a code no row chose would be 0, its codeword 0 / 0)
            raise ValueError(f"eps must be > 0 (Laplace smoothing of the EMA counts), got {eps}")
        if kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be >= 0, got {kmeans_iters}")
        if threshold_ema_dead_code < 0:
            raise ValueError(f"threshold_ema_dead_code must be >= 0 (0: no dead-code replacement), got "
                             f"{threshold_ema_dead_code}")  # fmt: skip
        self.num_quantizers, self.codebook_size, self.codebook_dim = num_quantizers, codebook_size, codebook_dim
        self.decay, self.eps, self.kmeans_iters = decay, eps, kmeans_iters
        self.quantize_dropout, self.threshold_ema_dead_code = quantize_dropout, threshold_ema_dead_code
        self.commitment_weight, self.fast, self.dim = commitment_weight, fast, dim
        same = dim == codebook_dim
        self.project_in = nn.Identity() if same else nn.Linear(dim, codebook_dim)
        self.project_out = nn.Identity() if same else nn.Linear(codebook_dim, dim)
        shape = (num_quantizers, codebook_size, codebook_dim)
        embed = torch.zeros(shape) if kmeans_init else nn.init.kaiming_uniform_(torch.empty(shape))
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("cluster_size", torch.zeros(num_quantizers, codebook_size))
        self.register_buffer("initted", torch.full((num_quantizers,), float(not kmeans_init)))
        # Whether every stage is initialised, kept on the host so that a step never reads it back, and so that
        # torch.compile sees a Python bool (a read of the buffer inside a compiled graph is data-dependent).
        self._initted_seen = not kmeans_init
        self._register_load_state_dict_pre_hook(self._from_official_layout)
        self.register_load_state_dict_post_hook(_loaded)

    # ---- inference helpers of spec 1.6 ----
    def get_code_from_indices(self, indices: Tensor) -> Tensor:
        """``(N, Q)`` -> ``(N, codebook_dim)``: the sum of the codewords (-1 contributes 0)."""
        self._check_initialised()
        return rvq_decode(indices, self.embed)

    def codebook_digest(self) -> str:
        """A fingerprint of the codebooks: 16 hex digits of the SHA-256 of their values rounded to bfloat16 (so a
        copy cast to another dtype keeps it). ``taste encode`` writes it beside each row's codes, and whatever
        reads codes with a model checks it, so that codes are never decoded with other codebooks than theirs."""
        values = self.embed.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
        return hashlib.sha256(values.numpy().tobytes()).hexdigest()[:16]

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """``(N, Q)`` -> ``(N, dim)``: project_out of :meth:`get_code_from_indices`."""
        return self._projected_out(self.get_code_from_indices(indices))

    def get_indices_from_code(self, code: Tensor) -> Tensor:
        """``(N, codebook_dim)`` -> ``(N, Q)``: the greedy residual search on a code vector (no project_in)."""
        self._check_initialised()
        return rvq_encode(_float32_at_least(code), self.embed, fast=self.fast)[0]

    def encode(self, x: Tensor) -> Tensor:
        """``(N, dim)`` -> ``(N, Q)`` codes only, as the eval forward finds them (no EMA update, no dropout), without
        making the ``(N, dim)`` output: for tokenising speech into codes."""
        return self.get_indices_from_code(self._projected_in(x))

    def _projected_in(self, x: Tensor) -> Tensor:
        """project_in of checked rows of any float dtype, run in the projection's own (a float32 RVQ takes the
        16-bit rows of a bf16 aggregator; a module cast as a whole to 16 bits or to float64 runs in that)."""
        if x.dim() != 2 or x.shape[1] != self.dim or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point (N, dim={self.dim}) tensor, got {x.dtype} {tuple(x.shape)}")
        weight = getattr(self.project_in, "weight", None)
        return self.project_in(x if weight is None else x.to(weight.dtype))

    def _projected_out(self, codes: Tensor) -> Tensor:
        """project_out of the summed codewords (float32 at least) in the projection's dtype."""
        weight = getattr(self.project_out, "weight", None)
        return self.project_out(codes if weight is None else codes.to(weight.dtype))

    # ---- forward ----
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Quantizes packed rows.

        Args:
            x: ``(N, dim)`` float.

        Returns:
            ``quantized (N, dim)`` (straight-through in training), ``indices (N, Q)`` int64 (-1 for stages left out
            by quantizer dropout) and ``commit_loss`` () float32 (0 in eval mode, as vector-quantize-pytorch).
            Training also updates the codebooks by EMA (each stage k-means-initialised on the first batch it runs in).
        """
        z = _float32_at_least(self._projected_in(x))  # distances in float32 at least (spec 7.3)
        if not self.training:  # as vector-quantize-pytorch: no commitment loss outside training
            self._check_initialised()
            indices, quantized = rvq_encode(z, self.embed, fast=self.fast)
            return self._projected_out(quantized), indices, z.new_zeros(())
        num_stages = self._draw_num_stages(z.device) if self.quantize_dropout else None
        if not self._initted_seen:  # a host bool: nothing read back, nothing for torch.compile
            self._kmeans_init(z.detach(), num_stages)
        # The backward needs the codebooks of this forward; the EMA update below changes the buffer in place.
        out = rvq_quantize(z, self.embed.clone(), num_stages, fast=self.fast)
        self._ema_update(z.detach(), out.indices, num_stages)
        return self._projected_out(out.quantized), out.indices, out.commit_loss * self.commitment_weight

    def uninitialised_stages(self) -> list[int]:
        """The stages whose codebook k-means has not initialised yet (``kmeans_init=True`` and no training step
        that ran them): their codewords are zeros, so every code they give is 0. Reads ``initted`` on the host."""
        return [s for s, done in enumerate(self.initted.tolist()) if not done]

    def _check_initialised(self) -> None:
        """Warns once per module where a search (eval forward, codes-only encode) or a decode runs on stages that
        k-means never initialised: vector-quantize-pytorch gives code 0 for every row there, and 0 for every code,
        without a word. At most one host read per module (none once every stage is known to be initialised, none
        under torch.compile)."""
        if self._initted_seen or self._told_uninitialised or self.initted.is_meta:
            return
        if torch.compiler.is_compiling():
            return
        stages = self.uninitialised_stages()
        if not stages:
            self._initted_seen = True
            return
        self._told_uninitialised = True
        message = (
            f"taste: ResidualVQ stages {stages} of {self.num_quantizers} were never initialised (kmeans_init and no "
            "training step has run them): their codebooks are zeros, every code they give is 0 and every code decodes "
            "to 0 there. Train the model (stage 1-3) or load a trained checkpoint."
        )
        warnings.warn(message, stacklevel=2)

    def _draw_num_stages(self, device) -> Tensor:
        """Quantizer dropout: j ~ U{0..Q-1} drawn on the device, stages > j skipped; rank 0's draw on every rank."""
        depth = torch.randint(0, self.num_quantizers, (), device=device) + 1
        if _distributed():
            dist.broadcast(depth, src=0)
        return depth

    @torch.no_grad()
    def _ema_update(self, z: Tensor, indices: Tensor, num_stages: Tensor | None = None) -> None:
        """The moving averages of the stages that ran (``num_stages``, a device tensor; None: all). A stage left out
        by quantizer dropout keeps its statistics and codebook, as vector-quantize-pytorch, which does not run its
        layer at all: decaying them toward its zero counts would shorten the average of the later stages."""
        counts, sums, inputs = ema_statistics_and_inputs(z, indices, self.embed)  # (Q, K), (Q, K, d), (Q, N, d)
        picks = self._sample_stage_inputs(inputs) if self.threshold_ema_dead_code > 0 else None
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        # (the statistics are float32 at least; the buffers have whatever dtype the module was cast to)
        rate, ran = 1.0 - self.decay, None
        if num_stages is not None:
            ran = torch.arange(self.num_quantizers, device=z.device) < num_stages  # (Q,)
            rate = (ran.to(self.cluster_size.dtype) * rate)[:, None]  # (Q, 1): 0 leaves a stage as it was
        self.cluster_size.lerp_(counts.to(self.cluster_size.dtype), rate)
        self.embed_avg.lerp_(sums.to(self.embed_avg.dtype), rate if ran is None else rate[..., None])
        total = self.cluster_size.sum(-1, keepdim=True)
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        codebooks = self.embed_avg / smoothed[..., None]
        self.embed.copy_(codebooks if ran is None else torch.where(ran[:, None, None], codebooks, self.embed))
        if picks is not None:
            self._replace_dead_codes(*picks, ran)

    def _sample_stage_inputs(self, inputs: Tensor) -> tuple[Tensor, Tensor | None] | None:
        """K random rows of every stage's input residual ``inputs (Q, N, d)`` (codebooks as they were in the
        forward): ``(picks (Q, K, d), usable)``, where ``usable`` (a device bool, or None for always) says whether
        any rows were there to draw from. None where there are none (N = 0, not distributed).

        Under ``torch.distributed`` every rank takes the picks of the first rank that has rows (found and sent by
        all-reduces on the device, no host read), so dead codes are replaced alike and the codebooks stay equal."""
        q, k, n = self.num_quantizers, self.codebook_size, inputs.shape[1]
        if n:
            rows = torch.randint(0, n, (q, k), device=inputs.device)
            picks = inputs[torch.arange(q, device=inputs.device)[:, None], rows]
        else:
            picks = inputs.new_zeros((q, k, inputs.shape[2]))
        if not _distributed():
            return (picks, None) if n else None
        rank, world = dist.get_rank(), dist.get_world_size()
        first = torch.full((), rank if n else world, device=inputs.device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)  # every rank calls the same collectives, rows or not
        picks = torch.where(first == rank, picks, 0.0)
        dist.all_reduce(picks)  # the first rank's picks, zeros from every other
        return picks, first < world

    def _replace_dead_codes(self, picks: Tensor, usable: Tensor | None, ran: Tensor | None) -> None:
        """Codes whose EMA count fell below the threshold get a random row of their stage's input residual (as
        vector-quantize-pytorch's expire_codes_), in the stages that ran, without reading anything back to the
        host."""
        dead = self.cluster_size < self.threshold_ema_dead_code  # (Q, K)
        if usable is not None:
            dead = dead & usable
        if ran is not None:
            dead = dead & ran[:, None]
        self.embed.copy_(torch.where(dead[..., None], picks, self.embed))
        self.embed_avg.copy_(torch.where(dead[..., None], picks * self.threshold_ema_dead_code, self.embed_avg))
        self.cluster_size.copy_(torch.where(dead, self.threshold_ema_dead_code, self.cluster_size))

    @torch.no_grad()
    @_eager_only
    def _kmeans_init(self, z: Tensor, num_stages: Tensor | None = None) -> None:
        """Each uninitialised stage among the ``num_stages`` that run in this step (None: all) runs Lloyd's k-means
        on its input residual of this batch (initial centroids: a random sample of rows; an empty cluster keeps its
        centroid), as vector-quantize-pytorch does: there a layer left out by quantizer dropout is not run, so it is
        initialised on the first batch it runs in. Until every stage has been, each training step reads the
        dropout depth and the stages' state on the host. The assignment step is the fused encoder with one stage;
        the update is a deterministic segment sum."""
        if bool(self.initted.all()):  # (a load that could not tell, e.g. onto meta tensors, left it unknown)
            self._initted_seen = True
            return
        residual = z
        for s in range(self.num_quantizers if num_stages is None else int(num_stages)):
            if not bool(self.initted[s]):
                means, bins = kmeans(residual, self.codebook_size, self.kmeans_iters, fast=self.fast)
                self.embed[s] = means
                self.embed_avg[s] = means * bins[:, None]  # EMA sums, as vector-quantize-pytorch
                self.cluster_size[s] = bins
                self.initted[s] = 1.0
            _, chosen = rvq_encode(residual, self.embed[s : s + 1], fast=self.fast)
            residual = residual - chosen
        self._initted_seen = bool(self.initted.all())

    # ---- checkpoints ----
    def _from_official_layout(self, state_dict, prefix, *args, **kwargs):
        self._initted_seen = False
        if f"{prefix}layers.0._codebook.embed" not in state_dict:
            return
        for name in _BUFFERS:
            parts = [state_dict.pop(f"{prefix}layers.{i}._codebook.{name}") for i in range(self.num_quantizers)]
            own = getattr(self, name)  # per stage: drop the leading 1 ((1, K, d) -> (K, d), [1] or () -> ())
            state_dict[f"{prefix}{name}"] = torch.stack([p.reshape(own.shape[1:]).to(own.dtype) for p in parts])
        for key in [k for k in state_dict if k.startswith(f"{prefix}layers.") or k.startswith(f"{prefix}mlps.")]:
            del state_dict[key]  # remaining per-layer keys and the unused implicit-codebook MLPs

    def load_official_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        """Loads the RVQ part of an official TASTE checkpoint (keys under :data:`OFFICIAL_PREFIX`)."""
        own = {k[len(OFFICIAL_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(OFFICIAL_PREFIX)}
        return self.load_state_dict(own, strict=strict, assign=assign)
