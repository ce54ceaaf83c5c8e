"""Transcoders known by name: `<model>/<dir>` for `models_cache/<model>/<dir>/config.yaml`.

The demo CLT is `gemma-3-270m/clt`. The API resolves names only (never a path a client sent);
the CLI may also pass a transcoder directory (`allow_paths=True`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from backend.errors import NotFoundError, UserError
from backend.settings import Settings

log = logging.getLogger(__name__)

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
TRANSCODER_NAME = re.compile(rf"({_PART})/({_PART})")


def _is_transcoder_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file()


def transcoder_names(settings: Settings) -> list[str]:
    """`<model>/<dir>` for every directory of models_cache holding a transcoder config.yaml."""
    root = Path(settings.models_cache)
    if not root.is_dir():
        return []
    names = []
    for model_dir in sorted(root.iterdir()):
        if not model_dir.is_dir() or not re.fullmatch(_PART, model_dir.name):
            continue
        for sub in sorted(model_dir.iterdir()):
            if sub.is_dir() and re.fullmatch(_PART, sub.name) and ".." not in sub.name and _is_transcoder_dir(sub):
                names.append(f"{model_dir.name}/{sub.name}")
    return names


def list_transcoders(settings: Settings) -> list[dict]:
    """One row per named transcoder: name, model, summary (transcoder_summary) or error."""
    from backend.models.transcoder_files import transcoder_summary
    rows = []
    for name in transcoder_names(settings):
        row: dict = {"name": name, "model": name.split("/", 1)[0]}
        try:
            summary = transcoder_summary(Path(settings.models_cache) / name)
            summary.pop("path", None)  # names, never server paths, leave the worker
            row["summary"] = summary
        except UserError as err:  # a broken directory is listed with its problem, not hidden
            row["summary"] = None
            row["error"] = str(err)
        rows.append(row)
    return rows


def is_transcoder_name(ref: str) -> bool:
    """True when `ref` has the shape of a transcoder name (no `..`, exactly one `/`)."""
    match = TRANSCODER_NAME.fullmatch(ref)
    return bool(match) and ".." not in match.group(1) and ".." not in match.group(2)


def resolve_transcoder(ref: str, settings: Settings, allow_paths: bool = False) -> tuple[str, Path]:
    """(name, directory) of the transcoder `ref`.

    A name `<model>/<dir>` must exist under models_cache. With `allow_paths`, `ref` may also be
    a transcoder directory (its name is then `<parent>/<dir>`). Unknown -> NotFoundError
    listing the known names.
    """
    root = Path(settings.models_cache).resolve()
    if is_transcoder_name(ref):
        path = (root / ref).resolve()
        if path.is_relative_to(root) and _is_transcoder_dir(path):
            return ref, path
    if allow_paths:
        path = Path(ref).expanduser()
        if path.is_dir() and _is_transcoder_dir(path):
            path = path.resolve()
            return f"{path.parent.name}/{path.name}", path
    known = ", ".join(transcoder_names(settings)) or "(none)"
    raise NotFoundError(f"unknown transcoder '{ref}'; known transcoders: {known} "
                        "(a transcoder is named <model>/<dir> for models_cache/<model>/<dir>/config.yaml)")
