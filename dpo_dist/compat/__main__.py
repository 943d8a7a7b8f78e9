"""`python -m dpo_dist.compat`: rewrite the "Library patches" section of docs/compat.md (in a checkout) from the
registry; elsewhere print it."""
from pathlib import Path

from dpo_dist.compat import DOC, markdown

path = Path(__file__).resolve().parents[2] / DOC
if path.is_file():
    head = path.read_text(encoding="utf-8").split("## Library patches", 1)[0]
    path.write_text(head + markdown() + "\n", encoding="utf-8")
    print(f"wrote {path}")
else:
    print(markdown())
