"""The store: migrations up/down/up, schema == ORM, PostgreSQL DDL, and the query functions,
on SQLite and on a real PostgreSQL server (`store_url` is parametrised over both)."""

from __future__ import annotations

import io

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError

from backend.circuits.results import (AggregatedFeature, Circuit, FeatureOccurrence, PromptCircuit, Stat,
                                      SweepResult, SweepRow)
from backend.errors import InvalidParameterError, NotFoundError
from backend.store import queries
from backend.store.db import alembic_config, downgrade_to, make_engine, session_factory, transaction, upgrade_to_head
from backend.store.tables import Base
from tests.api_fixtures import pg_cluster, store_url  # noqa: F401 (fixtures)

TABLES = {"models", "transcoders", "datasets", "jobs", "circuits", "sweeps", "sweep_points", "features",
          "examples", "explanations", "explanation_revisions", "explanation_scores", "annotations",
          "edge_circuits", "edge_sweeps", "hierarchies"}


@pytest.fixture
def url(store_url) -> str:
    return store_url


@pytest.fixture
def sessions(url):
    upgrade_to_head(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_on_an_empty_database(url):
    upgrade_to_head(url)
    assert _tables(url) == TABLES
    downgrade_to(url, "base")
    assert _tables(url) == set()
    upgrade_to_head(url)
    assert _tables(url) == TABLES


def test_migrations_create_exactly_the_orm_schema(url):
    upgrade_to_head(url)
    engine = make_engine(url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    assert diff == []


def test_migrations_render_for_postgresql():
    """Nothing SQLite-only: the same revisions emit valid PostgreSQL DDL (offline mode)."""
    config = alembic_config("postgresql://piescope@localhost/piescope")
    config.output_buffer = io.StringIO()
    command.upgrade(config, "head", sql=True)
    ddl = config.output_buffer.getvalue()
    assert "CREATE TABLE circuits" in ddl and "JSON" in ddl and "TIMESTAMP WITH TIME ZONE" in ddl
    assert "CONSTRAINT uq_features_transcoder_id_layer_index UNIQUE (transcoder_id, layer, index)" in ddl


def make_circuit(method: str = "fap", k: int = 4, kl: float = 0.25, task: str = "ioi") -> Circuit:
    kept = [FeatureOccurrence(layer=1, feature=7, position=3, score=0.5, activation=1.2, delta=0.8)]
    prompt = PromptCircuit(index=0, clean="a b", corrupted="a c", tokens=["a", "b"], n_active=10, kept=kept,
                           kl_last=kl, kl_all=None, pred_changed=False, faithfulness=0.9, completeness=None)
    return Circuit(model="tiny-llama", transcoder="tiny-llama/clt", task=task, method=method, k=k,
                   budget="global", corruption="corrupted_prompt", options={"alpha": 1}, prompts=[prompt],
                   features=[AggregatedFeature(layer=1, feature=7, n_prompts=1, mean_abs_score=0.5)],
                   kl=Stat(kl, 0.1, (kl - 0.05, kl + 0.05)), pred_change_rate=0.0, faithfulness_mean=0.9,
                   completeness_mean=None, seconds=1.5, cost={"patched_forwards": 3.0})


def make_sweep() -> SweepResult:
    row = SweepRow(method="fap", k=4, kl_mean=0.2, kl_std=0.1, kl_ci95=(0.1, 0.3), pred_change_rate=0.0,
                   faithfulness_mean=0.8, n_prompts=2, seconds=0.5)
    rnd = SweepRow(method="random", k=8, kl_mean=0.9, kl_std=0.2, kl_ci95=(0.7, 1.1), pred_change_rate=0.5,
                   faithfulness_mean=0.1, n_prompts=2, seconds=0.1)
    return SweepResult(model="tiny-llama", transcoder="tiny-llama/clt", task="ioi", n_prompts=2,
                       corruption="corrupted_prompt", methods=["fap"], ks=[4], rows=[row], random_curve=[rnd],
                       effective_compression={"fap": {"4": 2.0}}, effective_budget=[],
                       per_prompt_kl={"fap": {"4": [0.1, 0.3]}}, n_active_mean=10.0, kl_none_mean=1.0, seconds=0.6)


def _inputs(session):
    model = queries.get_or_create_model(session, "tiny-llama", "llama")
    tc = queries.get_or_create_transcoder(session, "tiny-llama/clt", model,
                                          {"kind": "clt", "layers": 3, "d_model": 32, "features": 16})
    ds = queries.get_or_create_dataset(session, "h" * 64, model, "ioi", {}, 2, 0, [{"clean": "a b"}])
    return model, tc, ds


def test_circuit_round_trip_and_filters(sessions):
    with transaction(sessions) as s:
        model, tc, ds = _inputs(s)
        first = queries.save_circuit(s, make_circuit("fap", 4), "1" * 64, model, tc, ds).id
        queries.save_circuit(s, make_circuit("random", 4), "2" * 64, model, tc, ds)
        queries.save_circuit(s, make_circuit("fap", 8, task="docstring"), "3" * 64, model, tc, ds)
    with sessions() as s:
        assert queries.circuit_result(queries.get_circuit(s, first)) == make_circuit("fap", 4)
        rows, total = queries.list_circuits(s, model="tiny-llama", method="fap")
        assert total == 2 and {r.k for r in rows} == {4, 8}
        rows, total = queries.list_circuits(s, task="ioi", method="fap", k=4)
        assert total == 1 and rows[0].id == first
        assert queries.list_circuits(s, model="other")[1] == 0
        rows, total = queries.list_circuits(s, limit=1, offset=1)
        assert total == 3 and len(rows) == 1
    with transaction(sessions) as s:
        queries.set_circuit_graph(s, first, None, {"nodes": [], "links": []})
        queries.set_circuit_graph(s, first, 0, {"nodes": [1], "links": []})
    with sessions() as s:
        assert set(queries.get_circuit(s, first).graphs) == {"all", "0"}
        assert queries.get_circuit(s, first).graph_keys == ["0", "all"]


def test_sweep_round_trip_with_points(sessions):
    with transaction(sessions) as s:
        model, tc, ds = _inputs(s)
        sweep_id = queries.save_sweep(s, make_sweep(), "4" * 64, model, tc, ds).id
    with sessions() as s:
        row = queries.get_sweep(s, sweep_id)
        assert SweepResult.from_json(row.result) == make_sweep()
        assert [(p.method, p.k, p.is_random) for p in row.points] == [("fap", 4, False), ("random", 8, True)]


def test_features_are_unique_per_transcoder_layer_index(sessions):
    with transaction(sessions) as s:
        _, tc, _ = _inputs(s)
        f = queries.get_or_create_feature(s, tc, 1, 7, {"density": 0.01})
        assert queries.get_or_create_feature(s, tc, 1, 7).id == f.id
    with sessions() as s:
        assert queries.find_feature(s, "tiny-llama/clt", 1, 7).statistics == {"density": 0.01}
        with pytest.raises(NotFoundError):
            queries.find_feature(s, "tiny-llama/clt", 1, 8)
    from backend.store.tables import Feature
    with pytest.raises(IntegrityError), transaction(sessions) as s:
        s.add(Feature(model_id=tc.model_id, transcoder_id=tc.id, layer=1, index=7, statistics={}))


def test_explanation_edits_keep_history_and_annotations_validate(sessions):
    with transaction(sessions) as s:
        _, tc, _ = _inputs(s)
        feature = queries.get_or_create_feature(s, tc, 0, 3)
        exp = queries.create_explanation(s, feature.id, "<b>names</b>", "llm", "bot", "gpt-x")
        queries.update_explanation(s, exp.id, text="names of people", source="human", author="ann")
        queries.add_score(s, exp.id, "clarity", 0.7, "fade")
        queries.create_annotation(s, explanation_id=exp.id, rating=2, label="good", author="ann")
        exp_id, feature_id = exp.id, feature.id
    with sessions() as s:
        current = queries.get_explanation(s, exp_id)
        assert (current.text, current.source, current.revision) == ("names of people", "human", 2)
        history = queries.list_revisions(s, exp_id)
        assert [(r.revision, r.text, r.author) for r in history] == [(1, "<b>names</b>", "bot"),
                                                                     (2, "names of people", "ann")]
        assert [a.rating for a in queries.list_annotations(s, feature_id=feature_id)] == [2]
        assert queries.list_scores(s, exp_id)[0].value == pytest.approx(0.7)
    with pytest.raises(InvalidParameterError), transaction(sessions) as s:
        queries.create_annotation(s, explanation_id=exp_id, rating=3)
    with pytest.raises(InvalidParameterError), transaction(sessions) as s:
        queries.create_explanation(s, feature_id, "x", "oracle")


def test_mark_interrupted_fails_only_unfinished_jobs(sessions):
    with transaction(sessions) as s:
        for i, status in enumerate(("queued", "running", "done", "failed")):
            job = queries.create_job(s, "prune", {"i": i}, str(i) * 64, "cpu")
            job.status = status
    with transaction(sessions) as s:
        assert queries.mark_interrupted(s) == 2
    with sessions() as s:
        rows, _ = queries.list_jobs(s)
        by_hash = {j.params_hash[0]: j for j in rows}
        assert by_hash["0"].status == by_hash["1"].status == "failed"
        assert by_hash["1"].error == queries.INTERRUPTED
        assert by_hash["2"].status == "done" and by_hash["3"].error is None


def test_an_undefined_faithfulness_mean_is_stored_not_a_failed_job(sessions):
    """Corrupted = clean: no occurrence differs, M_none = M_clean on every prompt, so no
    faithfulness ratio is defined and the means are None. Storing the circuit and the sweep (and
    listing them through the API schema) must work, instead of failing after all the compute."""
    import dataclasses

    from backend.api.routers.results import _circuit_fields
    from backend.api.schemas import CircuitSummary
    from backend.circuits.pipeline import PruneConfig, SweepConfig, run_prune, run_sweep
    from tests.pie_fixtures import pie_setup
    s = pie_setup("llama", n_prompts=2)
    batch = dataclasses.replace(s.batch, corrupted_ids=s.batch.clean_ids.clone())
    kw = dict(model_name="tiny-llama", transcoder_name="tiny-llama/clt", task_name="ioi")
    circuit = run_prune(s.adapter, s.transcoder, batch, PruneConfig(method="fap", k=3), **kw)
    sweep = run_sweep(s.adapter, s.transcoder, batch, SweepConfig(methods=["fap"], ks=[3]), **kw)
    assert circuit.faithfulness_mean is None and sweep.rows[0].faithfulness_mean is None
    with transaction(sessions) as session:
        model, tc, ds = _inputs(session)
        circuit_id = queries.save_circuit(session, circuit, "5" * 64, model, tc, ds).id
        sweep_id = queries.save_sweep(session, sweep, "6" * 64, model, tc, ds).id
    with sessions() as session:
        row = queries.get_circuit(session, circuit_id)
        assert queries.circuit_result(row).faithfulness_mean is None
        assert CircuitSummary(**_circuit_fields(row)).faithfulness_mean is None
        assert [p.faithfulness_mean for p in queries.get_sweep(session, sweep_id).points] == [None] * 2


def test_timestamps_read_back_timezone_aware_in_utc(sessions):
    from datetime import datetime, timedelta, timezone
    later = datetime(2026, 12, 1, 10, 30, tzinfo=timezone(timedelta(hours=2)))
    with transaction(sessions) as s:
        job = queries.create_job(s, "prune", {}, "t" * 64, "cpu")
        job.started_at = later
        job_id = job.id
    with sessions() as s:
        row = queries.get_job(s, job_id)
        assert row.created_at.tzinfo is not None and row.created_at.utcoffset() == timedelta(0)
        assert row.started_at == later and row.started_at.utcoffset() == timedelta(0)
    with pytest.raises(Exception, match="naive datetime"), transaction(sessions) as s:
        queries.get_job(s, job_id).finished_at = datetime(2026, 12, 1)
