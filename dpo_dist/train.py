"""Public per-rank entry point, kept where launchers and scripts name it: `python -m dpo_dist.train RECIPE ...`
(torchrun -m, accelerate launch -m, deepspeed --module). The code is dpo_dist.training.run."""
import sys

from dpo_dist.training.run import main, run_recipe, run_stage  # noqa: F401  (the public names)

if __name__ == "__main__":
    sys.exit(main())
