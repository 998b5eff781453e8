"""Trains the tiny LLaVA on the processes of a launcher and records SGG's state; tests/test_distributed.py runs it.

    torchrun --nproc_per_node 2 tests/dist_llava.py RUN.yaml OUT.pt
    accelerate launch --config_file configs/accelerate/fsdp2_1node.yaml --num_processes 2 --cpu \
        tests/dist_llava.py RUN.yaml OUT.pt

RUN.yaml is a complete run config. Rank 0 writes, for every trained parameter, its full value and,
for SGG runs, the full first moment, cluster ids and scales, and the global MDA.
"""

import os
import sys

import torch
import torch.distributed as dist
import yaml

from llava_sgg.optim import SGG
from llava_sgg.train.config import build_run_config
from llava_sgg.train.run import build_trainer, leave_process_group


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _fsdp_on_cpu() -> None:
    """accelerate turns FSDP on only for GPU-type process groups; fully_shard itself runs on CPU/gloo.

    Before the Trainer's accelerator state is built, the (already initialised, CPU) process
    state is labelled multi-GPU, so that the FSDP plugin from the run config or the launcher's
    --config_file is honoured on the CI's CPU processes. Devices stay the CPU.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, **kwargs):
        state = PartialState()
        fsdp = kwargs.get("fsdp_plugin") is not None or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        if fsdp and state.distributed_type == DistributedType.MULTI_CPU:
            state.distributed_type = DistributedType.MULTI_GPU
        init(self, *args, **kwargs)

    AcceleratorState.__init__ = patched


def main(config_path: str, out: str) -> None:
    cfg = build_run_config(yaml.safe_load(open(config_path)), origin=config_path)
    if torch.cuda.device_count() == 0:
        _fsdp_on_cpu()
    trainer, _ = build_trainer(cfg)
    trainer.train(resume_from_checkpoint=cfg.train.resume_from_checkpoint)
    sgg = trainer.optimizer
    while not isinstance(sgg, SGG) and hasattr(sgg, "optimizer"):
        sgg = sgg.optimizer
    record = {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
              "fsdp": trainer.is_fsdp_enabled, "params": {}, "exp_avg": {}, "ids": {}, "scales": {},
              "global_mda": sgg.global_mda if isinstance(sgg, SGG) else None,
              "log_history": trainer.state.log_history, "dtypes": {}}
    policy = getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None), "mixed_precision_policy", None)
    record["mp_policy"] = None if policy is None else (str(policy.param_dtype), str(policy.reduce_dtype))
    for name, p in trainer.model.named_parameters():
        if not p.requires_grad:
            continue
        record["params"][name] = _full(p.detach()).float().cpu().clone()
        record["dtypes"][name] = str(p.dtype)
        if isinstance(sgg, SGG) and p.ndim >= 2:
            record["exp_avg"][name] = _full(sgg.state[p]["exp_avg"]).float().cpu().clone()
            ids = sgg.cluster_ids(p)
            record["ids"][name] = None if ids is None else _full(ids).cpu().clone()
            record["scales"][name] = sgg.cluster_scales(p).cpu().clone()
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(record, out)
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
