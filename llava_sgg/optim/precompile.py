"""SGG's Triton kernels compiled in background threads, before the first re-clustering needs them.

Triton compiles a kernel at its first launch with a new specialization. A process with an empty
Triton cache (a fresh container, a new node, a new Triton) would otherwise compile a dozen kernels at
the first re-clustering, one after another, while the GPU waits, and every rank of a multi-GPU run at
once. Built on CUDA, :class:`SGG` starts :func:`start`: threads run the re-clustering functions and
the optimizer's fused steps on small stand-ins of its parameters, each thread on a CUDA stream of its
own. Triton's compilation (its passes, ptxas, the launcher's C compiler) runs mostly outside the GIL,
so the threads compile in parallel while training goes on; the first re-clustering waits for what is
left (:meth:`Precompile.wait`).

A stand-in keeps what selects a kernel variant: device, dtype, number of dimensions, each dimension
modulo 16 and whether it is 1 (Triton specializes integer arguments on both), whether it is above
:data:`.fused.LARGE` or ``exact_limit``, and its parameter group's hyper-parameters. The stand-ins are
a shadow SGG of the same settings, so what it steps and re-clusters is what the real one will; a
variant they miss compiles at its first use, as without this. Nothing here touches the real
optimizer's parameters, state or random-number generators.
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import dtensor as D
from . import functional as F
from .fused import LARGE
from .launch import kernels_for

__all__ = ["Precompile", "compiled_variants", "stand_in_shape", "start"]

logger = logging.getLogger(__name__)

SHADOW_STEPS = 3  # step 1 without scales, step 2 re-clusters (interval 2), step 3 with scales


def stand_in_shape(shape: tuple[int, ...], minimum: int = 0) -> tuple[int, ...]:
    """A small shape of the same kernel variants as ``shape``: each dimension the same modulo 16, and 1
    where it is 1; the first dimension grown, keeping its residue, until there are ``minimum`` elements."""
    small = tuple(min(d, 16 + d % 16) for d in shape)
    if not small or math.prod(small) >= minimum:
        return small
    rest = math.prod(small[1:])
    first = -(-minimum // rest)
    first += (shape[0] - first) % 16
    return (first, *small[1:])


def _minimum(numel: int, exact_limit: int) -> int:
    """The fewest elements a stand-in needs to take the same paths as a tensor of ``numel``: a fused
    AdamW launch of its own (:data:`.fused.LARGE`), a sampled re-clustering (above ``exact_limit``)."""
    return max(LARGE if numel >= LARGE else 0, exact_limit + 1 if numel > exact_limit else 0)


def compiled_variants() -> set[tuple[str, str]]:
    """(kernel, specialization) of every kernel variant of :mod:`.kernels` this process has compiled or loaded."""
    from . import kernels

    return {(name, str(key)) for name, fn in vars(kernels).items() if hasattr(fn, "device_caches")
            for entry in fn.device_caches.values() for key in entry[0]}


@dataclass
class Precompile:
    """The background compilation of one SGG's kernels: :meth:`wait` joins it and reports."""

    pieces: int
    thread: threading.Thread | None = None
    seconds: float | None = None  # the compilation's wall time
    waited_s: float = 0.0  # how long the training loop waited for it
    errors: list[str] = field(default_factory=list)
    compiled: set | None = None  # the process's kernel variants when it was done

    def wait(self) -> None:
        if self.thread is None:
            return
        start = time.perf_counter()
        self.thread.join()
        self.thread = None
        self.waited_s = time.perf_counter() - start
        self.compiled = compiled_variants()
        for error in self.errors:
            logger.warning("SGG's kernel precompilation failed (kernels it missed compile at first use): %s", error)
        logger.info("SGG's kernels: compiled in the background in %.2f s; the first re-clustering waited %.2f s "
                    "for them", self.seconds or 0.0, self.waited_s)

    def report(self) -> dict:
        """What ran, how long, how long the loop waited, errors, and the kernels that compiled since (it missed them)."""
        later = None if self.compiled is None else sorted({name for name, _ in compiled_variants() - self.compiled})
        return {"pieces": self.pieces, "seconds": self.seconds, "waited_s": self.waited_s, "errors": self.errors,
                "compiled_later": later}


def start(sgg, devices: list[torch.device] | None = None, *, parallel: bool = True) -> Precompile | None:
    """Compile ``sgg``'s kernels in a background thread (its pieces in parallel threads unless not
    ``parallel``: Triton's interpreter, which the CPU tests run the kernels under, is not thread-safe).

    ``devices``: where to compile; by default every CUDA device of ``sgg``'s parameters whose tensors take
    the kernels. Returns None when there is nothing to compile (no such device, or ``n_clusters=1``,
    which never re-clusters: its one step variant compiles at the first step).
    """
    if not sgg._reclusters:
        return None
    params = [p for group in sgg.param_groups for p in group["params"] if p.requires_grad]
    if devices is None:
        devices = sorted({D.local(p).device for p in params if D.local(p).device.type == "cuda"}, key=str)
        devices = [d for d in devices if kernels_for(d)]
    pieces = []
    for device in devices:
        shadow = _shadow(sgg, device)
        if shadow is not None:
            pieces.append((device, shadow, _recluster_pieces(sgg, shadow)))
    if not pieces:
        return None
    job = Precompile(pieces=sum(1 + len(p) for _, _, p in pieces))
    job.thread = threading.Thread(target=_run, args=(job, pieces, parallel), name="sgg-precompile")
    job.thread.start()
    return job


def _run(job: Precompile, pieces, parallel: bool) -> None:
    start_time = time.perf_counter()
    with ThreadPoolExecutor(max_workers=job.pieces if parallel else 1) as pool:
        # Phase 1: the shadow's first step (no scales yet) and the re-clustering's functions, in parallel.
        first = [pool.submit(_on, device, lambda shadow=shadow: _shadow_step(shadow)) for device, shadow, _ in pieces]
        rest = [pool.submit(_on, device, fn) for device, _, fns in pieces for fn in fns]
        _collect(job, rest)
        shadows = _collect(job, first)
        # Phase 2: the shadow's re-clustering (compiled by now) and its first scaled step.
        if shadows:
            _collect(job, [pool.submit(_on, device, lambda shadow=shadow: [_shadow_step(shadow)
                                                                          for _ in range(SHADOW_STEPS - 1)])
                           for device, shadow, _ in pieces])
    job.seconds = time.perf_counter() - start_time


def _collect(job: Precompile, futures) -> bool:
    ok = True
    for future in futures:
        try:
            future.result()
        except Exception as error:  # reported at wait(); the real step compiles what was missed
            job.errors.append(f"{type(error).__name__}: {error}")
            ok = False
    return ok


def _on(device: torch.device, fn) -> None:
    if device.type != "cuda":
        fn()
        return
    with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
        fn()
        torch.cuda.current_stream().synchronize()  # errors of this piece surface here, in its thread


def _shadow(sgg, device: torch.device):
    """An SGG of ``sgg``'s settings over stand-ins of its parameters on ``device``, re-clustering every
    second step; None when its base optimizer cannot be built again from its defaults."""
    base = sgg.optimizer
    groups = []
    for group in sgg.param_groups:
        shapes = {}
        for p in group["params"]:
            local = D.local(p)
            if p.requires_grad and local.device == device:
                shapes[(stand_in_shape(tuple(local.shape), _minimum(local.numel(), sgg.exact_limit)), local.dtype)] = True
        if shapes:
            stand_ins = [torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
                         for shape, dtype in shapes]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": stand_ins})
    if not groups:
        return None
    accepted = inspect.signature(type(base).__init__).parameters
    defaults = {k: v for k, v in base.defaults.items() if k in accepted}
    try:
        shadow_base = type(base)(groups, **defaults)
    except Exception as error:
        logger.info("SGG precompilation skipped: %s cannot be built again (%s)", type(base).__name__, error)
        return None
    return type(sgg)(shadow_base, **{**sgg._options(), "recluster_interval": 2, "precompile": False})


def _shadow_step(shadow) -> None:
    generator = torch.Generator(device=shadow.param_groups[0]["params"][0].device).manual_seed(0)
    for group in shadow.param_groups:
        for p in group["params"]:
            with torch.no_grad():
                p.normal_(generator=generator)
            p.grad = torch.randn(p.shape, dtype=p.dtype, device=p.device, generator=generator)
    shadow.step()


def _recluster_pieces(sgg, shadow) -> list:
    """The paper rule's re-clustering functions (:meth:`SGG._recluster`) on rows of the shadow's sizes,
    each a piece that compiles its own kernels; the shadow's re-clustering later finds them compiled.
    Each piece makes its inputs on its own stream."""
    if sgg.rule != "mda":
        return []
    signed, k, frozen = sgg.cluster_on == "signed", sgg.n_clusters, sgg.assignment == "frozen"
    numels = [p.numel() for g in shadow.param_groups for p in g["params"] if shadow._eligible(p)]
    if not numels:
        return []
    device = shadow.param_groups[0]["params"][0].device
    sizes: dict[int, int] = {}  # work-row size: how many layers have it
    for n in numels:
        size = n if n <= sgg.exact_limit else sgg.sample_size
        sizes[size] = sizes.get(size, 0) + 1
    sampled = [n > sgg.exact_limit for n in numels]

    def inputs() -> tuple[list[Tensor], list[Tensor]]:
        generator = torch.Generator(device=device).manual_seed(0)
        values = [torch.randn(n, device=device, generator=generator) for n in numels]
        rows = [torch.randn(min(count, 2), size, device=device, generator=generator).sort(dim=1).values
                for size, count in sizes.items()]
        return values, rows

    def thresholds(row: Tensor) -> Tensor:  # [L, K-1]: increasing values inside each row
        picks = torch.linspace(0, row.shape[1] - 1, k + 1, device=device).long()[1:-1]
        return (row if signed else row.abs().sort(dim=1).values)[:, picks].contiguous()

    def kmeans():
        for row in inputs()[1]:
            F.kmeans_1d_rows(row, k, signed=signed, kernels=True)

    def cluster_mda():
        for row in inputs()[1]:
            F.rows_cluster_mda(row, row.mean(dim=1), thresholds(row), signed=signed, kernels=True)

    # deviation_median takes its one-pass bracket over a large pool (unsharded), with a kernel variant
    # per bracket slot count (one a program, at most 64): the stand-ins' pool takes the same path and
    # as many programs, padded with small tensors, through a sample of its own size.
    real = [D.local(p).numel() for g in sgg.param_groups for p in g["params"]
            if sgg._eligible(p) and D.local(p).device == device]
    slots = F.bracket_slots(real)
    bracket = not any(D.is_dtensor(p) for g in sgg.param_groups for p in g["params"]) and F.bracket_applies(sum(real))

    def median():
        values, _ = inputs()
        sample = F.MEDIAN_SAMPLE
        if bracket:  # small tensors of one program each, up to the real pool's slot count
            values += [torch.randn(16, device=device) for _ in range(slots - F.bracket_slots(numels))]
            sample = min(F.MEDIAN_SAMPLE, sum(x.numel() for x in values) // 4)
        F.deviation_median(values, [x.mean() for x in values], sample=sample, kernels=True)

    def assign():
        values, rows = inputs()
        F.assign_ids_many(values, thresholds(rows[0])[:1].expand(len(values), -1).contiguous(), signed=signed,
                          sizes=sampled, ids=frozen, kernels=True)

    return [kmeans, cluster_mda, median, assign]
