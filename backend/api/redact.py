"""No server path leaves the worker: messages are rewritten before they reach a client.

Known roots become their setting's name (`<models_cache>/gemma-3-270m/clt`, `<data_dir>/...`,
`<hf_cache>`, `<home>`); any other absolute path keeps only its last component
(`.../config.yaml`). Applied to error answers, job errors and messages, and the listings that
describe local files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from backend.settings import Settings

# An absolute POSIX path (two components at least; not a URL's, a root's rest or an API route)
# or a Windows drive path.
_ABSOLUTE = re.compile(r"(?<![\w.:/\\>])(?!/api/)(?:/[^\s/'\"(),;:]+){2,}/?|[A-Za-z]:\\[^\s'\"(),;]+")


def _roots(settings: Settings) -> list[tuple[str, str]]:
    pairs = [(settings.models_cache, "<models_cache>"), (settings.data_dir, "<data_dir>"),
             (settings.hf_cache, "<hf_cache>"), (Path.home(), "<home>")]
    out = []
    for path, name in pairs:
        if path is None:
            continue
        for form in {str(Path(path)), str(Path(path).expanduser().resolve())}:
            if len(form) > 1:
                out.append((form, name))
    return sorted(out, key=lambda pair: -len(pair[0]))  # longest first: nested roots win


def redact(text: str, settings: Settings) -> str:
    """`text` with every server filesystem path replaced as described above."""
    for root, name in _roots(settings):
        text = text.replace(root, name)
    return _ABSOLUTE.sub(lambda m: ".../" + m.group(0).rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1], text)


def redact_json(value: Any, settings: Settings) -> Any:
    """`redact` applied to every string inside a JSON-like value."""
    if isinstance(value, str):
        return redact(value, settings)
    if isinstance(value, list):
        return [redact_json(v, settings) for v in value]
    if isinstance(value, dict):
        return {k: redact_json(v, settings) for k, v in value.items()}
    return value
