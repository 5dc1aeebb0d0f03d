"""The bundled preference demo (``data.name=demo-preference``), derived from the reversal demo.

Each row of the string-reversal demo (``reverse: abc`` -> ``cba``) becomes a pair: the correct
reversal is chosen, and a near miss -- the correct answer with two neighbouring characters
swapped (or one character changed when swapping changes nothing) -- is rejected. The near miss is
chosen deterministically from the row number, so the data is the same on every machine.
"""

from __future__ import annotations

from typing import Any

#: The demo's alphabet (make_demo_assets.py draws strings from it).
LETTERS = "abcdefghij"


def near_miss(answer: str, row: int) -> str:
    """A wrong answer close to ``answer``: two neighbouring characters swapped, starting at a
    position picked by ``row``; when every neighbour pair is equal, one character replaced."""
    for shift in range(max(1, len(answer) - 1)):
        at = (row + shift) % max(1, len(answer) - 1)
        if at + 1 < len(answer) and answer[at] != answer[at + 1]:
            return answer[:at] + answer[at + 1] + answer[at] + answer[at + 2:]
    at = row % len(answer)
    other = LETTERS[(LETTERS.index(answer[at]) + 1) % len(LETTERS)] if answer[at] in LETTERS else "a"
    return answer[:at] + other + answer[at + 1:]


def demo_preference(path: str | None, split: str, options: dict[str, Any]) -> Any:
    """The reversal demo's rows (``sources.demo``: same splits and ``path``) as ``prompt``,
    ``chosen``, ``rejected``."""
    from automodel_cli.components.data.sources import demo

    table = demo(path, split, options)
    return table.map(
        lambda row, index: {"prompt": row["prompt"], "chosen": row["completion"],
                            "rejected": near_miss(row["completion"], index)},
        with_indices=True, remove_columns=table.column_names, desc="Pairing the reversal demo")
