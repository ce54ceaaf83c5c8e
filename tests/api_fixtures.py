"""Fixtures for store/API/job tests: a models_cache holding a tiny Llama and a random CLT, and
stores on both backends.

`tiny_cache` saves `tiny_model("llama")` with the tests' word-level tokenizer into
`<cache>/tiny-llama/model/` and a random 3-layer CLT into `<cache>/tiny-llama/clt/`, so both are
reachable by name (`tiny-llama`, `tiny-llama/clt`) exactly as real models are.
`api_settings` points Settings at that cache and a fresh SQLite database under tmp_path.
`store_url` is parametrised over the backends: a fresh SQLite file, and (marked `postgres`) a
fresh database in a throw-away PostgreSQL cluster that the session starts (`pg_cluster`);
`store_settings` is `api_settings` on that store. Settings answer TestClient's Host
('testserver') besides the loopback names.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.settings import LOOPBACK_HOSTS, Settings

TINY_MODEL = "tiny-llama"
TINY_CLT = "tiny-llama/clt"
TEST_HOSTS = ",".join((*LOOPBACK_HOSTS, "testserver"))
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


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


def tiny_settings(tiny_cache: Path, data_dir: Path, db_url: str | None = None) -> Settings:
    """Settings over the tiny cache, a data dir and a store (SQLite in data_dir when db_url is None)."""
    return Settings(models_cache=tiny_cache, data_dir=data_dir, db_url=db_url, api_token=None,
                    allowed_hosts=TEST_HOSTS, device="cpu", dtype="float32", _env_file=None)


@pytest.fixture
def api_settings(tiny_cache: Path, tmp_path: Path) -> Settings:
    """Settings over the tiny cache and an empty SQLite database in tmp_path (no token)."""
    return tiny_settings(tiny_cache, tmp_path / "data")


@pytest.fixture(scope="session")
def pg_cluster():
    """A PostgreSQL cluster for the whole session (started on first use, removed at the end)."""
    from tests.postgres import PgCluster
    with PgCluster() as cluster:
        yield cluster


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path: Path) -> str:
    """A fresh, empty store: a SQLite file, or a new PostgreSQL database (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'piescope.db'}"
        return
    cluster = request.getfixturevalue("pg_cluster")
    url = cluster.database()
    yield url
    cluster.drop(url)


@pytest.fixture
def store_settings(tiny_cache: Path, tmp_path: Path, store_url: str) -> Settings:
    """`api_settings` on the parametrised store (both backends)."""
    return tiny_settings(tiny_cache, tmp_path / "data", None if store_url.startswith("sqlite") else store_url)
