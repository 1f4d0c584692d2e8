"""FSDP2 over a CoMoE model, run by tests/test_fsdp.py under `torchrun --nproc_per_node 2` (gloo, CPU).

`fully_shard` goes over every decoder layer, then over the root (the PeftModel). Each process trains on its slice
of one global batch; the script writes the global loss of each step to `report.json` and, from process 0, the
gathered adapter as a normal peft adapter folder. `reference_losses` trains the same model in one process on the
whole batch, for the comparison.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)

from conftest import shut_down_process_group, tiny_llama, token_batch  # noqa: E402
from peft import get_peft_model  # noqa: E402

from comoe_peft import CoMoEConfig  # noqa: E402

STEPS = 3
GLOBAL_BATCH = 4


def build_model():
    """The tiny Llama with a CoMoE adapter, identical in every process (seeded). The losses it trains with are
    per-token means (task, contrastive with every activated expert as anchor, z), so the mean over equal slices of a
    batch is the loss of the whole batch; the Switch balance loss is not (a product of batch means), so it is off."""
    model = tiny_llama(seed=0)
    torch.manual_seed(1)
    config = CoMoEConfig(r=4, lora_alpha=8, num_experts=4, top_k=2, target_modules=["q_proj", "v_proj", "o_proj"],
                         init_weights=False, contrastive_loss_coef=0.1, anchor="all", router_z_loss_coef=1e-3)
    return get_peft_model(model, config)


def global_batch() -> dict[str, torch.Tensor]:
    return token_batch(batch=GLOBAL_BATCH, seq=12, pad_left=0)  # no padding: every row has as many tokens


def step_loss(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs, labels=inputs["input_ids"])
    return out.loss + model.base_model.get_aux_loss()


def train(model, inputs: dict[str, torch.Tensor], reduce=None) -> list[float]:
    """STEPS AdamW steps; `reduce` turns this process's loss into the global one (None: one process)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = step_loss(model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(reduce(loss.detach()) if reduce else loss.item())
    return losses


def reference_losses() -> tuple[list[float], torch.nn.Module]:
    """One process, the whole global batch: the losses FSDP must reproduce, and the trained model."""
    model = build_model()
    return train(model, global_batch()), model


def main(output_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model = build_model()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = [n for n, p in model.named_parameters() if ".comoe_" in n and isinstance(p, DTensor)]

    per_rank = GLOBAL_BATCH // world
    local = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in global_batch().items()}

    def global_mean(loss: torch.Tensor) -> float:
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        return loss.item() / world

    losses = train(model, local, reduce=global_mean)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)  # gathered on every rank, kept on rank 0
    if rank == 0:
        model.save_pretrained(os.path.join(output_dir, "adapter"), state_dict=state)
        report = {"world_size": world, "losses": losses, "sharded_adapter_tensors": len(sharded),
                  "model_class": type(model).__name__}
        with open(os.path.join(output_dir, "report.json"), "w") as handle:
            json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1])  # the FSDP model is freed when main returns
    shut_down_process_group()
