"""Answers during training (train.sample_prompts, train.sample_every): every N optimizer steps the model answers a few
prompts greedily, and the prompt and answer go to the run directory's samples.jsonl and to the run's trackers.

Every rank takes part: under FSDP or ZeRO-3 each forward gathers the sharded weights from all ranks, so the ranks
split the prompts, generate in step (transformers' synced_gpus) and rank 0 collects the answers; under DDP each rank
answers its share alone. Sampling never changes what the run learns: it runs in eval mode without gradients, and
the random-number state is put back afterwards, so the losses with and without it are the same.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from dpo_dist.training.common import drop_rows_after


def read_sample_prompts(path: str) -> list[list[dict]]:
    """The conversations of a prompts file in `dpo-dist generate`'s format (checked before: preflight.check_data)."""
    from dpo_dist.data.prompts import read_prompt_file

    return [messages for _, _, messages in read_prompt_file(path)]


class SampleCallback(TrainerCallback):
    def __init__(self, prompts: list[list[dict]], tokenizer, renderer, every: int, max_new_tokens: int, path: Path,
                 sharded: bool, log=print):
        self.prompts, self.tokenizer, self.renderer = prompts, tokenizer, renderer
        self.every, self.max_new_tokens, self.path, self.sharded, self.log = every, max_new_tokens, path, sharded, log
        self.tensorboard = None  # transformers' TensorBoard callback, when the run reports to TensorBoard

    def attach(self, trainer) -> None:
        from transformers.integrations import TensorBoardCallback

        self.tensorboard = next((c for c in trainer.callback_handler.callbacks
                                 if isinstance(c, TensorBoardCallback)), None)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            drop_rows_after(self.path, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every:
            return
        answers = self.answer(model)
        if not state.is_world_process_zero:
            return
        rows = [{"step": state.global_step, "prompt": messages[-1]["content"], "messages": messages,
                 "response": answer} for messages, answer in zip(self.prompts, answers)]
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        self.to_trackers(args, state.global_step, rows)
        self.log(f"[samples] step {state.global_step}: {len(rows)} answer{'s' if len(rows) != 1 else ''} → "
                 f"{self.path}")

    @torch.no_grad()
    def answer(self, model) -> list[str]:
        """This rank's share of the prompts answered greedily, one at a time (no padding: every profile sees the
        same inputs), then every rank's answers in prompt order."""
        from dpo_dist.distributed.ranks import rank, world_size
        from dpo_dist.inference.scoring import generate

        me, world = rank(), world_size()
        share = self.prompts[me::world]
        # In step: every rank makes as many generate calls as the rank with the most prompts (repeats are dropped).
        calls = -(-len(self.prompts) // world)
        padded = share + [self.prompts[0]] * (calls - len(share))
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        training = model.training
        root = _fsdp_root(model)
        if root is not None:  # generate skips the root's own forward hook, which would gather its weights
            root.unshard()
        try:
            mine = [generate(model, self.tokenizer, self.renderer, [messages], max_new_tokens=self.max_new_tokens,
                             batch_size=1, synced_gpus=self.sharded and world > 1)[0] for messages in padded]
        finally:
            if root is not None:
                root.reshard()
            model.train(training)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        mine = mine[:len(share)]
        if world == 1:
            return mine
        shares = [None] * world
        torch.distributed.all_gather_object(shares, mine)
        return [shares[i % world][i // world] for i in range(len(self.prompts))]

    def to_trackers(self, args, step: int, rows: list[dict]) -> None:
        """The step's answers as a table in each tracker the run reports to (rank 0 only)."""
        columns = {"step": [r["step"] for r in rows], "prompt": [r["prompt"] for r in rows],
                   "response": [r["response"] for r in rows]}
        if "mlflow" in args.report_to:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.log_table(columns, artifact_file="samples.json")  # appended to the run's one table
        if "wandb" in args.report_to:
            import wandb

            if wandb.run is not None:
                table = wandb.Table(columns=list(columns), data=[list(row) for row in zip(*columns.values())])
                wandb.run.log({"samples": table, "train/global_step": step})
        if self.tensorboard is not None and self.tensorboard.tb_writer is not None:
            text = "\n\n".join(f"**{r['prompt']}**\n\n{r['response']}" for r in rows)
            self.tensorboard.tb_writer.add_text("samples", text, step)


def _fsdp_root(model):
    """The FSDP2-sharded root module, or None when the model is not sharded by FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return model if isinstance(model, FSDPModule) else None
