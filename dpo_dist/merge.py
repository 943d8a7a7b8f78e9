"""Public import path of the adapter merge: `from dpo_dist.merge import merge_adapter`. The code is
dpo_dist.inference.merge."""
from dpo_dist.inference.merge import describe, merge_adapter  # noqa: F401  (the public names)
