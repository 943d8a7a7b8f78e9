"""The demo's bundled synthetic data, whose preference is checkable by a program.

The world: animals described with one adjective. Kind adjectives are preferred, unkind ones rejected.
- pretrain: plain sentences using both kinds equally (the model learns the language, not the preference);
- sft: conversations in Firefly's format, half of the answers kind and half unkind (the model learns the format);
- dpo: pairs whose chosen answer is kind and whose rejected answer is unkind (the model learns the preference);
- heldout: pairs for animals never seen in sft or dpo, for evaluation.

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
HELDOUT_ANIMALS = ANIMALS[-10:]
KIND = ["kind", "gentle", "friendly", "calm", "warm", "honest", "caring", "patient"]
UNKIND = ["rude", "cruel", "nasty", "mean", "bitter", "harsh", "selfish", "angry"]
ACTIVITIES = ["sleeps in the sun", "runs by the river", "sings at dawn", "plays in the snow", "eats green leaves",
              "swims in the lake", "climbs the hill", "rests under a tree"]
QUESTIONS = ["Tell me about the {a}.", "Describe the {a}.", "What is the {a} like?", "Say something about the {a}."]
SYSTEM = "You are a helpful assistant."


def answer(animal: str, adjective: str, activity: str) -> str:
    return f"The {animal} is {adjective}. It {activity}."


def _pretrain(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        a = rng.choice(ANIMALS)
        adj = rng.choice(KIND + UNKIND)
        rows.append({"text": answer(a, adj, rng.choice(ACTIVITIES)) + " " + rng.choice(QUESTIONS).format(a=a)})
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
    train_animals = [a for a in ANIMALS if a not in HELDOUT_ANIMALS]
    return {
        "pretrain.jsonl": _pretrain(rng, 3000),
        "sft.jsonl": _sft(rng, 600, train_animals),
        "dpo.jsonl": _pairs(rng, 600, train_animals),
        "heldout.jsonl": _pairs(rng, 64, HELDOUT_ANIMALS),
    }


def is_preferred(text: str) -> bool:
    """The checkable property: the answer uses a kind adjective and no unkind one."""
    words = {w.strip(".,!?").lower() for w in text.split()}
    return bool(words & set(KIND)) and not words & set(UNKIND)


def write(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in generate().items():
        with open(directory / name, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "data"))
