"""The demo's bundled synthetic data, whose preference is checkable by a program.

The world: animals described with one adjective. Kind adjectives are preferred, unkind ones rejected.
- pretrain: plain sentences using both kinds equally (the model learns the language, not the preference);
- sft: conversations in Firefly's format, half of the answers kind and half unkind (the model learns the format);
- dpo: pairs whose chosen answer is kind and whose rejected answer is unkind (the model learns the preference);
- heldout: pairs for evaluation; no held-out prompt+answer appears in the sft or dpo data.

`python -m dpo_dist.demo.synth DIR` regenerates the files; the test suite checks the bundled ones match.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ANIMALS = [
    "fox", "owl", "cat", "dog", "bear", "wolf", "deer", "hare", "crow", "duck", "goat", "lamb", "lion", "mole",
    "mouse", "seal", "swan", "toad", "frog", "hawk", "horse", "otter", "panda", "robin", "shark", "sheep", "snake",
    "tiger", "whale", "zebra", "eagle", "camel", "koala", "llama", "moose", "raven", "bison", "crane", "finch", "gecko",
]
KIND = ["kind", "gentle", "friendly", "calm", "warm", "honest", "caring", "patient"]
UNKIND = ["rude", "cruel", "nasty", "mean", "bitter", "harsh", "selfish", "angry"]
ACTIVITIES = ["sleeps in the sun", "runs by the river", "sings at dawn", "plays in the snow", "eats green leaves",
              "swims in the lake", "climbs the hill", "rests under a tree"]
QUESTIONS = ["Tell me about the {a}.", "Describe the {a}.", "What is the {a} like?", "Say something about the {a}."]
SYSTEM = "You are a helpful assistant."


def answer(animal: str, adjective: str, activity: str) -> str:
    # The answer does not repeat the animal: a model this small cannot learn to copy it within the demo's budget,
    # and the preference being taught is the adjective.
    return f"It is {adjective}. It {activity}."


def _pretrain(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        a = rng.choice(ANIMALS)
        adj = rng.choice(KIND + UNKIND)
        rows.append({"text": rng.choice(QUESTIONS).format(a=a) + " " + answer(a, adj, rng.choice(ACTIVITIES))})
    return rows


def _sft(rng: random.Random, n: int, animals: list[str]) -> list[dict]:
    rows = []
    for i in range(n):
        turns = []
        for _ in range(1 if i % 3 else 2):  # every third conversation has two turns
            a = rng.choice(animals)
            adj = rng.choice(KIND if rng.random() < 0.5 else UNKIND)
            turns.append({"human": rng.choice(QUESTIONS).format(a=a), "assistant": answer(a, adj, rng.choice(ACTIVITIES))})
        rows.append({"conversation": turns, "system": SYSTEM} if i % 2 else {"conversation": turns})
    return rows


def _pairs(rng: random.Random, n: int, animals: list[str]) -> list[dict]:
    rows = []
    for _ in range(n):
        a, activity = rng.choice(animals), rng.choice(ACTIVITIES)
        rows.append({
            "prompt": rng.choice(QUESTIONS).format(a=a),
            "chosen": answer(a, rng.choice(KIND), activity),
            "rejected": answer(a, rng.choice(UNKIND), activity),
        })
    return rows


def generate(seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    sft, dpo = _sft(rng, 600, ANIMALS), _pairs(rng, 600, ANIMALS)
    seen = {(t["human"], t["assistant"]) for row in sft for t in row["conversation"]}
    seen |= {(p["prompt"], p[side]) for p in dpo for side in ("chosen", "rejected")}
    heldout = [p for p in _pairs(rng, 200, ANIMALS)
               if (p["prompt"], p["chosen"]) not in seen and (p["prompt"], p["rejected"]) not in seen][:64]
    return {"pretrain.jsonl": _pretrain(rng, 3000), "sft.jsonl": sft, "dpo.jsonl": dpo, "heldout.jsonl": heldout}


def is_preferred(text: str) -> bool:
    """The checkable property: a well-formed answer ("It is <adjective>. It <activity>.") whose adjective is kind,
    with no unkind word anywhere."""
    words = [w.strip(".,!?").lower() for w in text.split()]
    well_formed = words[:2] == ["it", "is"] and len(words) > 2 and text.strip().endswith(".")
    return well_formed and words[2] in KIND and not set(words) & set(UNKIND)


def write(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in generate().items():
        with open(directory / name, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "data"))
