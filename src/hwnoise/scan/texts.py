"""Calibration texts: a built-in set written for hwnoise, or texts read from a file.

The built-in set mixes prose, code and arithmetic so that a scan sees the kinds of activations a
chat model sees. A file holds one text per line, or is GSM8K-style JSON lines (the "question" field).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

__all__ = ["BUILTIN_TEXTS", "DEFAULT_SAMPLES", "calibration_texts", "read_texts"]

DEFAULT_SAMPLES = 8
# A one-line string ending so, or holding no whitespace at all, names a file (it must exist).
TEXT_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".md")

# Interleaved (prose, code, arithmetic, ...) so that the first N texts are a mix for any N.
BUILTIN_TEXTS = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, trimmed the wick, and "
    "watched the fishing boats turn home before the fog rolled in from the cold northern sea.",
    "def moving_average(values, window):\n    total = sum(values[:window])\n    out = [total / window]\n"
    "    for i in range(window, len(values)):\n        total += values[i] - values[i - window]\n"
    "        out.append(total / window)\n    return out",
    "A baker sells 48 loaves on Monday and twice as many on Tuesday. Each loaf costs 3 dollars. "
    "How much money does the baker make over the two days? 48 + 96 = 144 loaves, and 144 * 3 = 432 dollars.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. The green pigment "
    "chlorophyll absorbs red and blue light, which is why most leaves look green to our eyes.",
    "SELECT customer_id, COUNT(*) AS orders, SUM(amount) AS revenue\nFROM sales\n"
    "WHERE order_date >= '2024-01-01'\nGROUP BY customer_id\nHAVING COUNT(*) > 5\nORDER BY revenue DESC;",
    "If a train leaves at 9:15 and travels 210 kilometres at 70 kilometres per hour, it arrives three "
    "hours later, at 12:15. A second train that is 15 minutes late arrives at 12:30.",
    "Dear Maya, thank you for the lovely afternoon in the garden. The tomatoes you gave me are already "
    "on the windowsill, and I promise to return the blue bowl before the end of the month. Warm wishes, Tom.",
    "#include <stdio.h>\n\nint main(void) {\n    int sum = 0;\n    for (int i = 1; i <= 100; i++) {\n"
    "        if (i % 3 == 0 || i % 5 == 0) sum += i;\n    }\n    printf(\"%d\\n\", sum);\n    return 0;\n}",
    "Solve for x: 3x + 7 = 25. Subtract 7 from both sides to get 3x = 18, then divide by 3, so x = 6. "
    "Check: 3 * 6 + 7 = 18 + 7 = 25, which is correct.",
    "In 1869 the first transcontinental railroad in the United States was completed when the last spike "
    "was driven at Promontory Summit, cutting the journey across the country from months to about a week.",
    "const fetchUser = async (id) => {\n  const response = await fetch(`/api/users/${id}`);\n"
    "  if (!response.ok) throw new Error(`status ${response.status}`);\n  return response.json();\n};",
    "Janet has 5 boxes with 12 pencils in each box. She gives 17 pencils to her classmates and keeps the "
    "rest. 5 * 12 = 60, and 60 - 17 = 43, so Janet keeps 43 pencils.",
    "To brew a good cup of tea, warm the pot first, use one spoonful of leaves per person, pour water just "
    "off the boil, and let it steep for four minutes before pouring through a strainer.",
    "class Stack:\n    def __init__(self):\n        self._items = []\n\n    def push(self, item):\n"
    "        self._items.append(item)\n\n    def pop(self):\n        if not self._items:\n"
    "            raise IndexError('pop from empty stack')\n        return self._items.pop()",
    "The area of a circle with radius 4 is pi * 4^2 = 16 * pi, about 50.27 square units. Doubling the "
    "radius to 8 multiplies the area by four, giving 64 * pi, about 201.06 square units.",
    "User: Can you suggest a name for a small bookshop by the river?\nAssistant: How about \"The Riverside "
    "Reader\"? It is short, easy to remember, and tells customers exactly where to find you.",
    "git checkout -b fix/timeout\n# raise the default timeout from 30 to 60 seconds\nsed -i 's/TIMEOUT = 30/"
    "TIMEOUT = 60/' config.py\ngit commit -am \"Raise default timeout\"\ngit push origin fix/timeout",
    "A rectangle is 7 metres long and 4 metres wide. Its perimeter is 2 * (7 + 4) = 22 metres and its area "
    "is 7 * 4 = 28 square metres. A square with the same perimeter has sides of 5.5 metres.",
    "Glaciers move slowly downhill under their own weight, grinding the rock beneath them into fine powder "
    "that turns meltwater rivers a milky turquoise colour in early summer.",
    "The sequence 2, 6, 18, 54 multiplies by 3 each time, so the next term is 162 and the sum of the first "
    "five terms is 2 + 6 + 18 + 54 + 162 = 242.",
)


def read_texts(path: str | os.PathLike) -> list[str]:
    """Texts from a file: JSON lines with a "question" field (GSM8K) or a "text" field, else one
    text per non-empty line."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"texts file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read texts file {str(path)!r}: {err}") from err
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    if lines and lines[0].startswith("{"):
        texts = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{str(path)!r} line {number} is not valid JSON ({err.msg})") from None
            text = record.get("question", record.get("text")) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(
                    f"{str(path)!r} line {number}: expected a JSON object with a \"question\" (GSM8K) or "
                    f"\"text\" string field"
                )
            texts.append(text)
        lines = texts
    if not any(t.strip() for t in lines):
        raise ValueError(f"texts file {str(path)!r} holds no text (expected one text per line or GSM8K jsonl)")
    return lines


def _names_a_file(text: str) -> bool:
    if "\n" in text or not text.strip():
        return False
    stripped = text.strip()
    return (Path(stripped).expanduser().is_file() or not any(c.isspace() for c in stripped)
            or stripped.lower().endswith(TEXT_FILE_SUFFIXES))


def calibration_texts(texts: Iterable[str] | str | os.PathLike | None = None,
                      samples: int | None = DEFAULT_SAMPLES) -> list[str]:
    """The calibration texts: the built-in set (None), a file path, or a sequence of strings;
    the first ``samples`` of them (None: all). Empty input is a ValueError.

    A single string is a file path when it is one line and either names an existing file, holds
    no whitespace, or ends in a text-file suffix (.txt, .jsonl, .json, .csv, .tsv, .md); a path
    that does not exist is a ValueError, never calibration text. Any other string is one text;
    to calibrate on a one-word text, pass it in a list (``["hello"]``)."""
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ValueError(f"samples must be a positive integer or None; got {samples!r}")
    if texts is None:
        items = list(BUILTIN_TEXTS)
    elif isinstance(texts, os.PathLike) or (isinstance(texts, str) and _names_a_file(texts)):
        path = Path(texts.strip()).expanduser() if isinstance(texts, str) else texts
        if isinstance(texts, str) and not path.is_file():
            raise ValueError(f"texts file {texts!r} does not exist (a one-line string without spaces, or ending "
                             f"in {', '.join(TEXT_FILE_SUFFIXES)}, is read as a path); to use it as one "
                             f"calibration text, pass a list: texts=[{texts!r}]")
        items = read_texts(path)
    elif isinstance(texts, str):
        items = [texts]  # one text
    else:
        items = list(texts)
        for item in items:
            if not isinstance(item, str):
                raise ValueError(f"calibration texts must be strings; got {type(item).__name__}: {item!r:.60}")
    items = [t for t in items if t.strip()]
    if not items:
        raise ValueError("no calibration texts: give at least one non-empty text (or texts=None for the built-in set)")
    return items[:samples] if samples is not None else items
