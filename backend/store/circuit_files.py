"""Circuit JSON files (as `piescope prune --out` writes them) imported into the store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sqlalchemy import select

from backend.errors import UserError
from backend.settings import Settings


def import_circuit_file(settings: Settings, sessions, path: Path) -> int:
    """Store a circuit JSON file (as written by `piescope prune --out`); returns its circuit id.

    The same file imports to the same row (the file's hash is its params hash), so its cost JSON
    accumulates over explain and score runs.
    """
    from backend.circuits.results import Circuit
    from backend.models.registry import MODELS
    from backend.models.transcoder_files import transcoder_summary
    from backend.models.transcoder_registry import resolve_transcoder
    from backend.store import queries
    from backend.store.db import transaction
    from backend.store.tables import Circuit as CircuitRow
    raw = path.read_bytes()
    try:
        result = Circuit.from_json(json.loads(raw))
    except (ValueError, TypeError, KeyError) as err:
        raise UserError(f"{path} is not a circuit JSON file ({err})") from None
    digest = hashlib.sha256(b"file:" + raw).hexdigest()
    with transaction(sessions) as session:
        existing = session.scalar(select(CircuitRow.id).where(CircuitRow.params_hash == digest))
        if existing is not None:
            return int(existing)
        spec = MODELS.get(result.model)
        model = queries.get_or_create_model(session, result.model, spec.architecture if spec else "")
        _, tc_path = resolve_transcoder(result.transcoder, settings, allow_paths=False)
        transcoder = queries.get_or_create_transcoder(session, result.transcoder, model, transcoder_summary(tc_path))
        return queries.save_circuit(session, result, digest, model, transcoder, None).id
