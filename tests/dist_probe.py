"""Run on every rank by tests/test_distributed.py under a real launcher: train a recipe, then record the logits
the still-sharded model gives on a fixed batch, so a test can compare them with the saved adapter loaded by
plain PEFT on one process.

    <launcher> tests/dist_probe.py RECIPE PROFILE OUT.pt [key=value ...]
"""
from __future__ import annotations

import sys

import torch


def main() -> None:
    recipe_path, profile_name, out, *overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    from dpo_dist.distributed.backends import Launch, check_run, resolve
    from dpo_dist.config.profiles import load_profile
    from dpo_dist.config.recipe import load_recipe
    from dpo_dist.training.run import run_recipe

    recipe, profile = load_recipe(recipe_path, overrides), load_profile(profile_name)
    launch = Launch.from_env()
    backend = resolve(profile, launch)
    check_run(recipe, profile, launch, backend)
    result = run_recipe(recipe, profile, backend=backend, keep_trainer=True, log=lambda *_: None)[-1]
    model = result.trainer.model
    model.eval()
    ids = torch.arange(3, 35).reshape(2, 16)  # every rank feeds the same batch; the shards are gathered per layer
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    if launch.rank == 0:
        torch.save({"input_ids": ids, "logits": logits, "summary": result.summary}, out)


if __name__ == "__main__":
    main()
