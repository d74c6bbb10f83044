"""The one place that imports DeepSpeed: process group, engine construction, parameter shards.

Everything above this module talks to `DistributedEngine`, never to deepspeed or
torch.distributed directly. Parameter-space operations of the upper level (meta-gradient copies,
norms, inner products, perturb-and-restore) work on each rank's *own* elements only and combine
the results with all-reduces of a few floats:

- ZeRO-3: a rank owns its flat partition ``param.ds_tensor`` (sliced to the real element count:
  the last rank's partition carries padding). Edits to the partition become visible to the next
  forward only after the gathered-parameter cache is emptied; small "persistent" parameters that
  ZeRO-3 keeps gathered on every rank are re-gathered explicitly.
- ZeRO-0/1/2: parameters are whole on every rank; a rank owns a contiguous slice of each flattened
  parameter for reductions, and edits are applied to the whole tensor on every rank alike.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

import warnings  # noqa: E402

# DeepSpeed calls torch.distributed APIs that torch 2.13 marks deprecated, once per collective.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)

import deepspeed  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402
from deepspeed.utils import (safe_get_full_grad, safe_get_full_optimizer_state, safe_get_local_grad,  # noqa: E402
                             safe_get_local_optimizer_state)

from dreamprm.model.precision import fp32_compute  # noqa: E402


def _skip_cpu_shm_comm_op() -> None:
    # DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce op at every start (25-48 s on
    # 2 cores). gloo is fast enough for CPU runs, so the op is marked unavailable.
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(device: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Join (or create) the process group from the launcher's environment.

    Works under `deepspeed`, `torchrun`, `srun` (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* exported by
    the job script), `mpirun` (ranks discovered through mpi4py) and plain `python` (one rank).
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given but no CUDA device is available")
    if not use_cuda:
        _skip_cpu_shm_comm_op()
    single = not any(k in os.environ for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "WORLD_SIZE"))
    if single:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        # Under mpirun, DeepSpeed's MPI discovery overwrites MASTER_PORT with `distributed_port`
        # (default 29500): pass a MASTER_PORT the user set through, so that two jobs can share a node.
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=True,
                                   distributed_port=int(os.environ.get("MASTER_PORT", "29500")),
                                   verbose=False, timeout=datetime.timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", rank)))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        _share_cpu_threads()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def _share_cpu_threads() -> None:
    # Each CPU rank would start one thread per core; with several ranks per machine they fight for
    # the cores (measured: 2 ranks on 2 cores ran 5x slower). Split the cores unless told otherwise.
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE",
                      os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1")))).split("(")[0])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def partitioned_construction(ds_config: dict[str, Any]) -> Iterator[None]:
    """While open, Hugging Face `from_pretrained` partitions ZeRO-3 weights as it loads them.

    The `HfDeepSpeedConfig` object must stay alive until the model is built (transformers holds a
    weak reference to it); outside ZeRO-3 this does nothing.
    """
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    keep_alive = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del keep_alive


@dataclass
class _Owned:
    """One trainable parameter's elements owned by this rank."""
    param: nn.Parameter
    lo: int  # owned range in the flattened parameter (ZeRO-0/1/2) or in ds_tensor (ZeRO-3)
    hi: int


class DistributedEngine:
    """Wraps a DeepSpeed engine with what the bi-level trainer needs and nothing else."""

    def __init__(self, model: nn.Module, ds_config: dict[str, Any], info: DistInfo, *, upper_precision: str,
                 lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None):
        self.info = info
        self.upper_precision = upper_precision  # --upper_precision: 'fp32' or 'engine' (see upper_forward)
        self.ds_config = ds_config
        self.stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.module_engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model, model_parameters=trainable, config=ds_config, lr_scheduler=lr_scheduler)
        self._owned = [self._owned_range(p) for p in self.module.parameters() if p.requires_grad]

    # ----- basics
    @property
    def module(self) -> nn.Module:
        return self.module_engine.module

    @property
    def is_main(self) -> bool:
        return self.info.rank == 0

    @property
    def compute_dtype(self) -> torch.dtype:
        if self.module_engine.bfloat16_enabled():
            return torch.bfloat16
        return torch.float16 if self.module_engine.fp16_enabled() else torch.float32

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module_engine(**batch)

    def upper_forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The forward of an upper-level pass: in fp32 arithmetic on 16-bit parameters unless
        --upper_precision engine (dreamprm/model/precision.py says why and at what cost). Whatever
        backward follows it is then fp32 too."""
        upcast = self.upper_precision == "fp32" and self.compute_dtype != torch.float32
        with fp32_compute(upcast):
            return self.module_engine(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.module_engine.backward(loss)

    def step(self) -> None:
        self.module_engine.step()

    def skip_step(self) -> None:
        """End an accumulation window without updating: drop the gradients, keep the counters aligned."""
        self.drop_gradients()
        self.module_engine.micro_steps += 1

    def gradient_accumulation_steps(self) -> int:
        return self.module_engine.gradient_accumulation_steps()

    def is_accumulation_boundary(self) -> bool:
        return self.module_engine.is_gradient_accumulation_boundary()

    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The one place batches move to the device; floating inputs take the compute dtype."""
        out = {}
        for k, v in batch.items():
            v = v.to(self.info.device, non_blocking=True)
            out[k] = v.to(self.compute_dtype) if v.is_floating_point() and k == "pixel_values" else v
        return out

    # ----- collectives on small tensors
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.info.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.info.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` (same shape on all ranks) concatenated in rank order along dim 0."""
        if self.info.world_size == 1:
            return tensor
        pieces = [torch.empty_like(tensor) for _ in range(self.info.world_size)]
        dist.all_gather(pieces, tensor.contiguous())
        return torch.cat(pieces)

    def barrier(self) -> None:
        if self.info.world_size > 1:
            dist.barrier()

    # ----- parameter shards
    def _owned_range(self, p: nn.Parameter) -> _Owned:
        if self.stage == 3:
            size = p.ds_tensor.ds_numel
            real = max(0, min(size, p.ds_numel - self.info.rank * size))
            return _Owned(p, 0, real)
        n, w, r = p.numel(), self.info.world_size, self.info.rank
        return _Owned(p, n * r // w, n * (r + 1) // w)

    def owned_gradients(self) -> list[torch.Tensor]:
        """fp32 copies of this rank's elements of the current gradient (after backward, before step)."""
        out = []
        for o in self._owned:
            grad = self._owned_slice(o, safe_get_local_grad(o.param) if self.stage == 3 else safe_get_full_grad(o.param))
            out.append(torch.zeros(o.hi - o.lo) if grad is None else grad.clone())
        return out

    @staticmethod
    def _owned_slice(o: _Owned, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """The owned range of a (local ZeRO-3 or full) per-parameter tensor, detached fp32."""
        return None if tensor is None else tensor.reshape(-1)[o.lo:o.hi].detach().float()

    def full_gradients_for_edit(self, owned: list[torch.Tensor]) -> list[torch.Tensor]:
        """Direction vectors in the layout `perturb` edits: owned elements (ZeRO-3) or whole tensors."""
        if self.stage == 3 or self.info.world_size == 1:
            return owned
        full = []
        for o, piece in zip(self._owned, owned):
            gathered = [torch.empty(0)] * self.info.world_size
            dist.all_gather_object(gathered, piece.cpu())
            full.append(torch.cat(gathered).to(piece.device))
        return full

    def drop_gradients(self) -> None:
        """Forget the gradients of a backward pass that is not followed by a step."""
        self.module_engine.optimizer.zero_grad()

    def backward_without_step(self, loss: torch.Tensor) -> list[torch.Tensor]:
        """Gradient of `loss` (averaged over ranks, not scaled for accumulation), owned elements, fp32.

        The engine's gradients are dropped afterwards, so the optimiser never sees them.
        """
        engine = self.module_engine
        engine.set_gradient_accumulation_boundary(True)
        try:
            engine.backward(loss, scale_wrt_gas=False)
            if self.module_engine.fp16_enabled():
                scale = float(self.module_engine.optimizer.loss_scale)
            else:
                scale = 1.0
            grads = self.owned_gradients()
            if scale != 1.0:
                grads = [g / scale for g in grads]
        finally:
            self.drop_gradients()
            engine.set_gradient_accumulation_boundary(None)
        return grads

    @staticmethod
    def local_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        """This rank's share of ⟨a, b⟩ (owned elements only), float64 on the CPU; all-reduce to finish."""
        return sum(((x.double() * y.double()).sum().cpu() for x, y in zip(a, b)), torch.zeros((), dtype=torch.float64))

    def global_dot(self, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        local = self.local_dot(a, b).reshape(1).to(self.info.device)
        return self.all_reduce_sum(local).cpu()[0]

    def adam_preconditioner(self, damping: float = 1e-2) -> list[torch.Tensor] | None:
        """1 / (sqrt(v̂) + δ) for this rank's owned elements, from the PRM optimiser's own second
        moment v̂ (ZeRO-3 keeps it sharded beside the gradient partitions, so this stays shard-local).

        δ = `damping` x the mean of sqrt(v̂) over all elements (one all-reduce), not Adam's 1e-8:
        elements whose gradients have been ~0 so far would otherwise get factors up to 1e8 and the
        direction P v would be theirs alone, where the linearised Adam step is meaningless (Adam's
        real step there is bounded by its first moment). None before the optimiser's first step."""
        step = self._optimizer_step_count()
        if step == 0:
            return None
        beta2 = self.optimizer.param_groups[0].get("betas", (0.9, 0.999))[1]
        correction = 1.0 - beta2 ** step
        roots = []
        for o in self._owned:
            state = self._owned_slice(o, safe_get_local_optimizer_state(o.param, "exp_avg_sq") if self.stage == 3
                                      else safe_get_full_optimizer_state(o.param, "exp_avg_sq"))
            if state is None:
                return None
            roots.append((state / correction).sqrt())
        totals = torch.stack([sum((r.double().sum().cpu() for r in roots), torch.zeros((), dtype=torch.float64)),
                              torch.tensor(float(sum(r.numel() for r in roots)), dtype=torch.float64)])
        total, count = self.all_reduce_sum(totals.to(self.info.device)).cpu().tolist()
        delta = damping * total / max(count, 1.0) + 1e-12
        return [1.0 / (r + delta) for r in roots]

    def _optimizer_step_count(self) -> int:
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # ZeRO wraps the torch optimiser
        for state in inner.state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    def master_params_snapshot(self) -> list[torch.Tensor]:
        """Copies of the parameter storage that `perturb` edits, for an exact restore."""
        return [self._editable(o).clone() for o in self._owned]

    def _editable(self, o: _Owned) -> torch.Tensor:
        if self.stage == 3:
            return o.param.ds_tensor.data.view(-1)[: o.hi]
        return o.param.data.view(-1)

    def perturb(self, snapshot: list[torch.Tensor], direction: list[torch.Tensor], alpha: float) -> None:
        """Set parameters to ``snapshot + alpha * direction`` (ZeRO-3: owned elements; else whole).

        The sum is formed in fp32 and stored in the parameter dtype: with bf16 parameters this is
        the original's rounding-prone perturbation.
        """
        for o, base, d in zip(self._owned, snapshot, direction):
            target = self._editable(o)
            target.copy_((base.float() + alpha * d.to(base.device)).to(target.dtype))
        self._after_edit()

    def restore(self, snapshot: list[torch.Tensor]) -> None:
        for o, base in zip(self._owned, snapshot):
            self._editable(o).copy_(base)
        self._after_edit()

    def _after_edit(self) -> None:
        if self.stage != 3:
            return
        # Cached gathered parameters would hide the edit from the next forward. The ZeRO optimiser's
        # own release, not the engine's: that one also runs gc.collect(), ~0.5 s per call in a
        # trainer-sized Python process (3 calls per fd upper step; measured with cProfile).
        self.module_engine.optimizer.empty_partition_cache()
        for o in self._owned:
            p = o.param
            if getattr(p, "ds_persist", False) and p.data.numel() == p.ds_numel:
                full = torch.empty(p.ds_tensor.ds_numel * self.info.world_size, dtype=p.ds_tensor.dtype,
                                   device=p.ds_tensor.device)
                if self.info.world_size > 1:
                    dist.all_gather_into_tensor(full, p.ds_tensor.data)
                else:
                    full.copy_(p.ds_tensor.data)
                p.data.copy_(full[: p.ds_numel].view_as(p.data))

    # ----- checkpoints and export
    def save_checkpoint(self, folder: str, tag: str, client_state: dict[str, Any]) -> tuple[str, Exception] | None:
        """DeepSpeed's save; a file write that fails on this rank is returned as (path, error), not raised.

        DeepSpeed's save is collective (all-reduces before the writes, a barrier after them): a rank
        that raised out of it (disk full, quota, I/O error) would leave the others waiting in that
        barrier. So its writes are wrapped: after the first failure the rest of this rank's writes
        are skipped, every rank passes through the same collectives, and the caller decides for all
        ranks together.
        """
        engine = self.module_engine
        writer = engine.checkpoint_engine
        failed: list[tuple[str, Exception]] = []

        def guarded(write: Callable[..., Any], path_of: Callable[..., str]) -> Callable[..., Any]:
            def run(*args: Any, **kwargs: Any) -> Any:
                if failed:
                    return None
                try:
                    return write(*args, **kwargs)
                except Exception as err:
                    failed.append((path_of(*args, **kwargs), err))
            return run

        save, copy_scripts = writer.save, engine._copy_recovery_script
        writer.save = guarded(save, lambda *a, **k: k.get("path", a[1] if len(a) > 1 else folder))
        engine._copy_recovery_script = guarded(copy_scripts, lambda *a, **k: a[0] if a else folder)
        try:
            engine.save_checkpoint(folder, tag=tag, client_state=client_state, save_latest=False)
        finally:
            writer.save, engine._copy_recovery_script = save, copy_scripts
        return failed[0] if failed else None

    def parameter_counts(self) -> tuple[int, int]:
        """(all, trainable) parameters of the whole model (under ZeRO-3 too, not this rank's partition)."""
        sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in self.module.parameters()]
        return sum(n for n, _ in sizes), sum(n for n, trainable in sizes if trainable)

    def load_checkpoint(self, folder: str, tag: str) -> dict[str, Any]:
        """DeepSpeed's load, with every file read by ``torch.load(..., weights_only=True)``.

        DeepSpeed's own reader unpickles arbitrary objects; its shards hold tensors, plain
        containers and two DeepSpeed classes, which are the only ones allowed here.
        """
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        reader = self.module_engine.checkpoint_engine

        def load_weights_only(path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler]):
                return torch.load(path, map_location=map_location, weights_only=True)

        original = reader.load
        reader.load = load_weights_only
        try:
            path, client_state = self.module_engine.load_checkpoint(folder, tag=tag, load_optimizer_states=True,
                                                                    load_lr_scheduler_states=True)
        finally:
            reader.load = original
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {folder}/{tag}")
        return client_state or {}

    def override_hyperparameters(self, lr: float, weight_decay: float) -> dict[str, tuple[float, float]]:
        """Make the configured learning rate and weight decay win over the ones a loaded checkpoint
        restored (PyTorch and DeepSpeed restore an optimiser's hyperparameters with its state, so a run
        branched from a checkpoint with a new --lr would silently keep the old one). The scheduler's
        decays so far are kept: lr_now = lr * (lr_now_saved / base_lr_saved). Returns the changes,
        {name: (checkpoint value, configured value)}."""
        scheduler = self.lr_scheduler
        saved_base = scheduler.base_lrs[0] if scheduler is not None else self.optimizer.param_groups[0]["lr"]
        saved_decay = self.optimizer.param_groups[0].get("weight_decay", weight_decay)
        changes = {name: (saved, now) for name, saved, now in (("lr", saved_base, lr),
                                                                ("weight_decay", saved_decay, weight_decay))
                   if saved != now}
        for group in self.optimizer.param_groups:
            decayed = group["lr"] / saved_base if saved_base else 1.0
            group["lr"], group["weight_decay"] = lr * decayed, weight_decay
            if "initial_lr" in group:
                group["initial_lr"] = lr
        if scheduler is not None:
            scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
            scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        return changes

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full 16-bit (or fp32) weights gathered on rank 0 (None on other ranks)."""
        if self.stage == 3:
            return self.module_engine._zero3_consolidated_16bit_state_dict()
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()} if self.is_main else None



def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (before the engine exists)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_ranks_ok(ok: bool) -> bool:
    """True when `ok` holds on every rank (before the engine exists)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def shutdown(clean: bool = True) -> None:
    """Leave the process group; a barrier first when every rank is expected to get here."""
    if not dist.is_initialized():
        return
    if clean and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()
