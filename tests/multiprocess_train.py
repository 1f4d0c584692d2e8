"""Run by tests/test_multiprocess.py under `accelerate launch --cpu --num_processes 2`: a short CoMoE SFT run."""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)

from conftest import multitask_rows, shut_down_process_group, tiny_llama, tiny_tokenizer
from datasets import Dataset

from comoe_peft import CoMoEConfig
from comoe_peft.training.trainer import CoMoESFTConfig, CoMoESFTTrainer


def main(output_dir: str) -> None:
    tokenizer = tiny_tokenizer()
    args = CoMoESFTConfig(output_dir=output_dir, per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                          save_strategy="no", report_to="none", bf16=False, use_cpu=True,
                          gradient_checkpointing=False, max_length=64, seed=0, disable_tqdm=True)
    trainer = CoMoESFTTrainer(model=tiny_llama(vocab=len(tokenizer)), args=args,
                              train_dataset=Dataset.from_list(multitask_rows()), processing_class=tokenizer,
                              peft_config=CoMoEConfig(r=4, num_experts=4, top_k=2,
                                                      target_modules=["q_proj", "v_proj"]))
    trainer.train()
    if trainer.accelerator.is_main_process:
        report = {
            "num_processes": trainer.accelerator.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "fsdp": bool(trainer.is_fsdp_enabled),
            "log_history": trainer.state.log_history,
        }
        with open(os.path.join(output_dir, "report.json"), "w") as handle:
            json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1])  # the trainer is freed when main returns
    shut_down_process_group()
