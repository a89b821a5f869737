"""Full-weight fine-tuning with ProjectedAdamW under FSDP2 (weights, gradients and state sharded), with `Trainer`.

Launch with torchrun (CPU processes with gloo, or one process per GPU); resume with ``--resume_from_checkpoint``:

    torchrun --nproc_per_node 2 recipes/train_projected_fsdp.py --output_dir outputs/fsdp --max_steps 100 --rank 64
    torchrun --nproc_per_node 2 recipes/train_projected_fsdp.py --output_dir outputs/fsdp --max_steps 200 \\
        --resume_from_checkpoint outputs/fsdp/checkpoint-100

The model is sharded by transformers itself (``from_pretrained(..., distributed_config=DistributedConfig(
fsdp_size=WORLD_SIZE))``: `fully_shard` per decoder layer, dim-0 DTensor shards), which `Trainer` then trains
without wrapping it again. Why not ``accelerate launch`` with an FSDP2 config: accelerate 1.16 enables FSDP only
for GPU-like devices (``AcceleratorState`` keeps MULTI_CPU out of its FSDP branch); with ``use_cpu: true`` and
``distributed_type: FSDP`` each process ends up with ``DistributedType.NO``, training alone, and under plain torchrun
on CPU accelerate wraps the model in DDP, which refuses DTensor weights. Trainer does not checkpoint the optimizer of
a model sharded at load time (it raises unless ``save_only_model``, and cannot reload the gathered weights into the
shards), so `DCPTrainer` saves and resumes the model, the optimizer and the scheduler through
`torch.distributed.checkpoint` (``<checkpoint>/dcp``, resharding). Embedded SmolLM2 on BBC article text by default;
``--step_in_backward`` frees each gradient during backward (``max_grad_norm 0``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.distributed import DistributedConfig

from hf_ext import smollm2_path
from hf_ext.data import bbc_lm_data
from hf_ext.optim import create_projected_optimizer, load_sharded_checkpoint, save_sharded_checkpoint

SCHEDULER = "scheduler.pt"


@dataclass
class FsdpRecipeArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub id or folder. Default: SmolLM2."})
    rank: int = field(default=64, metadata={"help": "Projection rank of the linear layers' weights."})
    projection: str = field(default="random", metadata={"help": "`random` or `svd` bases."})
    update_interval: int = field(default=200, metadata={"help": "Steps between basis changes."})
    step_in_backward: bool = field(default=False, metadata={"help": "Step and free each gradient in backward."})
    block_size: int = field(default=128, metadata={"help": "Tokens per block."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training blocks."})
    max_eval_samples: int | None = field(default=64, metadata={"help": "Evaluate on the first N held-out blocks."})


class DCPTrainer(Trainer):
    """`Trainer` whose checkpoints hold the sharded model, optimizer and scheduler in a DCP folder ``dcp``."""

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)  # the gathered model (from_pretrained-able) and trainer_state.json
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        save_sharded_checkpoint(folder / "dcp", self.model, self.optimizer)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), folder / SCHEDULER)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        pass  # weights come back with the optimizer, from the shards, in `_load_optimizer_and_scheduler`

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        load_sharded_checkpoint(Path(checkpoint) / "dcp", self.model, self.optimizer)
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / SCHEDULER, weights_only=True))


def main(args: FsdpRecipeArguments, training_args: TrainingArguments) -> dict[str, float]:
    set_seed(training_args.seed)
    path = args.model_name_or_path or str(smollm2_path())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model = AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(fsdp_size=world_size))
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, test = bbc_lm_data(tokenizer, args.block_size, max_train_blocks=args.max_train_samples,
                              max_eval_blocks=args.max_eval_samples)  # fmt: skip
    optimizer = create_projected_optimizer(
        model, rank=args.rank, lr=training_args.learning_rate, weight_decay=training_args.weight_decay,
        projection=args.projection, update_interval=args.update_interval, step_in_backward=args.step_in_backward,
        betas=(training_args.adam_beta1, training_args.adam_beta2), eps=training_args.adam_epsilon,
    )  # fmt: skip
    training_args.save_only_model = True  # Trainer's own optimizer files: replaced by the DCP folder
    trainer = DCPTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=test,
                         data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                         optimizers=(optimizer, None))  # fmt: skip
    output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    results = {"train_loss": output.training_loss, "global_step": trainer.state.global_step}
    results["eval_loss"] = trainer.evaluate()["eval_loss"]
    if trainer.is_world_process_zero():
        print(f"FSDP2 over {world_size} processes, {results['global_step']} steps: held-out loss "
              f"{results['eval_loss']:.4f}")  # fmt: skip
    return results


def parse_args(argv: list[str] | None = None) -> tuple[FsdpRecipeArguments, TrainingArguments]:
    parser = HfArgumentParser((FsdpRecipeArguments, TrainingArguments))
    parser.set_defaults(output_dir="outputs/projected_fsdp", max_steps=100, per_device_train_batch_size=4,
                        learning_rate=1e-4, logging_steps=10, save_strategy="steps", save_steps=50,
                        report_to="none", seed=42, use_cpu=not torch.cuda.is_available())  # fmt: skip
    return parser.parse_args_into_dataclasses(args=argv)


if __name__ == "__main__":
    main(*parse_args())
