"""Regenerate the pre-training demo corpus in this directory (deterministic, seeded).

    python automodel_cli/assets/pretrain_demo/make_corpus.py [OUT_DIR]

``automodel pretrain demo`` trains the bundled character-level tiny Llama on this text, so it
must show a clearly falling loss in well under two minutes on a CPU. The corpus is written from
small templates (no third-party text): short stories that keep repeating a name and a place,
counting runs, additions, weekly weather notes and alphabet runs. Each kind rewards something a
2-layer model can learn quickly: spelling of a small vocabulary, copying a name seen earlier in
the document, and incrementing numbers. Only characters of the demo tokenizer are used
(lower-case letters, digits, space, newline and basic punctuation).

Outputs: ``train.txt`` and ``validation.txt``, one document per paragraph (documents are
separated by a blank line, which is how pre-training reads .txt files by default).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

SEED = 2024
N_TRAIN, N_VALIDATION = 700, 60

NAMES = ["lily", "tom", "mia", "sam", "ava", "ben", "zoe", "max", "ella", "leo", "nora", "jack"]
ANIMALS = ["fox", "cat", "dog", "owl", "bear", "duck", "frog", "goat", "mouse", "horse"]
ADJECTIVES = ["small", "brave", "quiet", "happy", "clever", "old", "young", "tired", "kind", "busy"]
PLACES = ["river", "forest", "hill", "garden", "village", "lake", "farm", "meadow", "bridge", "market"]
THINGS = ["apple", "stone", "feather", "shell", "leaf", "coin", "key", "ribbon", "map", "bell"]
VERBS = ["walked to", "ran to", "looked at", "sang near", "slept by", "played at", "waited at"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
WEATHER = ["sunny", "rainy", "windy", "cloudy", "snowy", "foggy"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def story(rng: random.Random) -> str:
    name, animal, adjective = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(ADJECTIVES)
    home, thing = rng.choice(PLACES), rng.choice(THINGS)
    article = "an" if adjective[0] in "aeiou" else "a"
    lines = [f"once there was {article} {adjective} {animal} named {name}.", f"{name} lived near the {home}."]
    for _ in range(rng.randint(3, 7)):
        kind = rng.randrange(4)
        place = rng.choice(PLACES)
        if kind == 0:
            lines.append(f"one day {name} {rng.choice(VERBS)} the {place}.")
        elif kind == 1:
            lines.append(f"at the {place}, {name} found {'an' if thing[0] in 'aeiou' else 'a'} {thing}.")
        elif kind == 2:
            count = rng.randrange(len(NUMBERS))
            lines.append(f"{name} saw {NUMBERS[count]} {rng.choice(ANIMALS)}{'s' if count else ''} by the {place}.")
        else:
            lines.append(f"the {animal} was {rng.choice(ADJECTIVES)}, so {name} went back to the {home}.")
    lines.append(f"that night {name} kept the {thing} safe. the end.")
    return " ".join(lines)


def counting(rng: random.Random) -> str:
    start, step = rng.randint(0, 400), rng.choice([1, 1, 1, 2, 5, 10])
    run = [str(start + i * step) for i in range(rng.randint(12, 30))]
    return f"count by {step} from {start}: " + " ".join(run) + "."


def additions(rng: random.Random) -> str:
    facts = []
    for _ in range(rng.randint(6, 14)):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        facts.append(f"{a} + {b} = {a + b}.")
    return "sums: " + " ".join(facts)


def weather(rng: random.Random) -> str:
    town = rng.choice(PLACES)
    notes = [f"weather by the {town} this week."]
    for day in DAYS:
        notes.append(f"{day}: {rng.choice(WEATHER)}, {rng.randint(-5, 32)} degrees.")
    return " ".join(notes)


def alphabet(rng: random.Random) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    start = rng.randrange(10)
    run = letters[start:start + rng.randint(10, 16)]
    return f"letters from {run[0]} to {run[-1]}: {' '.join(run)}. again: {run}."


KINDS = [story, story, story, counting, additions, weather, alphabet]


def documents(n: int, rng: random.Random) -> list[str]:
    return [rng.choice(KINDS)(rng) for _ in range(n)]


def write_corpus(out: Path) -> None:
    rng = random.Random(SEED)
    out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.txt", N_TRAIN), ("validation.txt", N_VALIDATION)):
        (out / name).write_text("\n\n".join(documents(n, rng)) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_corpus(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
