"""What every command prints and writes: tables, progress bars, JSON files, one-line notes."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from backend.errors import UserError

Progress = Callable[[float, str], None]


def say(message: str) -> None:
    """A progress note on stderr (stdout stays for results)."""
    print(message, file=sys.stderr, flush=True)


def print_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
    """A plain aligned text table."""
    if not rows:
        print("(none)")
        return
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def progress_bar(desc: str):
    """A tqdm bar driven by the job functions' (fraction, message) progress callback."""
    from tqdm import tqdm
    bar = tqdm(total=1000, desc=desc, unit="‰", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def update(fraction: float, message: str) -> None:
        bar.n = int(1000 * min(max(fraction, 0.0), 1.0))
        bar.set_postfix_str(message[:60])
        bar.refresh()
    return bar, update


def finite(value):
    """NaN/inf -> None, so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def write_json(path: str, data: dict) -> None:
    """Standard JSON (non-finite floats become null) at `path`."""
    Path(path).write_text(json.dumps(finite(data), indent=1, allow_nan=False, default=_not_serialisable))
    say(f"wrote {path}")


def _not_serialisable(value: object) -> object:
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def parse_options(text: str | None, flag: str = "--options") -> dict:
    """A JSON object given on the command line."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{flag} must be a JSON object: {err}") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object, e.g. '{{\"lam\": 3}}'")
    return value
