"""Trains the tiny LLaVA on a launcher's processes with one rank's loss made NaN; tests/test_divergence.py runs it.

    torchrun --nproc_per_node 2 tests/dist_divergence.py RUN.yaml OUT_PREFIX RANK STEP

At optimizer step STEP the loss of process RANK alone is NaN, its gradient left finite (NaN times a
detached copy), so only that rank sees it. Every rank writes OUT_PREFIX.rank<N>.json with the
DivergenceError it stopped with (or null) and the steps it logged. Without the guard's reduction
over the ranks the other one would step on and wait for a collective that never comes.
"""

import json
import math
import sys

import torch.distributed as dist
import yaml

from dist_llava import _fsdp_on_cpu
from llava_sgg.train.config import build_run_config
from llava_sgg.train.guards import DivergenceError
from llava_sgg.train.run import build_trainer, leave_process_group
from llava_sgg.train.trainer import LlavaTrainer


def main(config_path: str, prefix: str, bad_rank: str, bad_step: str) -> None:
    cfg = build_run_config(yaml.safe_load(open(config_path)), origin=config_path)
    _fsdp_on_cpu()
    compute_loss = LlavaTrainer.compute_loss

    def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        if self.state.global_step + 1 == int(bad_step) and self.args.process_index == int(bad_rank):
            loss = loss + loss.detach() * math.nan
        return loss

    LlavaTrainer.compute_loss = poisoned
    trainer, _ = build_trainer(cfg)
    error = None
    try:
        trainer.train()
    except DivergenceError as caught:
        error = str(caught)
    record = {"error": error, "fsdp": trainer.is_fsdp_enabled,
              "logged": [row["step"] for row in trainer.state.log_history if "loss" in row]}
    with open(f"{prefix}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(record, f)
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
