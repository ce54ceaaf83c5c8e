"""Fixtures for store/API/job tests: a models_cache holding a tiny Llama and a random CLT.

`tiny_cache` saves `tiny_model("llama")` with the tests' word-level tokenizer into
`<cache>/tiny-llama/model/` and a random 3-layer CLT into `<cache>/tiny-llama/clt/`, so both are
reachable by name (`tiny-llama`, `tiny-llama/clt`) exactly as real models are.
`api_settings` points Settings at that cache and a fresh SQLite database under tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.settings import Settings

TINY_MODEL = "tiny-llama"
TINY_CLT = "tiny-llama/clt"


def build_tiny_cache(root: Path) -> Path:
    """Write the tiny model and CLT under `root` (a models_cache); returns `root`."""
    from backend.models.transcoder import Transcoder, TranscoderConfig
    from backend.models.transcoder_files import save_transcoder
    from tests.tiny_models import tiny_model
    from tests.tokenizers import tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    model.save_pretrained(root / TINY_MODEL / "model")
    tok.save_pretrained(root / TINY_MODEL / "model")
    clt = Transcoder.random(TranscoderConfig(kind="clt", n_layers=3, d_model=32, n_features=16,
                                             activation="relu", model_name=TINY_MODEL))
    save_transcoder(clt, root / TINY_MODEL / "clt")
    return root


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models_cache with `tiny-llama` and `tiny-llama/clt`, built once per test session."""
    return build_tiny_cache(tmp_path_factory.mktemp("models_cache"))


@pytest.fixture
def api_settings(tiny_cache: Path, tmp_path: Path) -> Settings:
    """Settings over the tiny cache and an empty SQLite database in tmp_path (no token)."""
    return Settings(models_cache=tiny_cache, data_dir=tmp_path / "data", db_url=None, api_token=None,
                    device="cpu", dtype="float32", _env_file=None)
