"""The in-process job executor: background threads, one heavy job per device at a time.

A job row moves queued -> running -> done | failed | cancelled. Its params are validated and
normalised by the kind's pydantic model and hashed; `submit` with params seen before returns
the existing row (queued/running: that job; done with its result still stored: the result,
nothing recomputed; failed/cancelled: the same row queued again).

Progress (fraction + message) is written to the jobs table at most every PROGRESS_INTERVAL
seconds. Cancelling a queued job is immediate; a running job stops at its next progress report
(the callback raises `Cancelled`). On start-up, jobs a dead process left queued/running are
marked failed ("interrupted: ..."): one API process owns the database (DESIGN 2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from backend import jobs as job_functions
from backend.api.redact import redact
from backend.errors import ConflictError, UserError
from backend.settings import Settings
from backend.store import queries
from backend.store.db import transaction
from backend.store.tables import Job

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.25
SHUTDOWN = "interrupted: the server shut down before the job finished"


class Cancelled(Exception):
    """Raised from a running job's progress callback once the job was cancelled."""


@dataclass(frozen=True)
class JobKind:
    """How to run one kind of job.

    params: the pydantic model of its parameters; normalise(params) fills in defaults before
    hashing. check(settings, session, params): cheap validation before queueing (UserError). run(context, sessions, params, progress)
    -> output. store(settings, session, params, output) -> {"circuit_id"|"sweep_id"|"hierarchy_id": id},
    called in the transaction that marks the job done.
    """

    params: type[BaseModel]
    check: Callable[[Settings, Session, Any], None]
    run: Callable[[job_functions.JobContext, sessionmaker, Any, job_functions.Progress], Any]
    store: Callable[[Settings, Session, Any, Any], dict[str, int]]
    normalise: Callable[[Any], Any] = lambda params: params


# ------------------------------------------------------------------------------ the PIE job kinds

def _dataset_hash(params: job_functions.DatasetParams) -> str:
    return hashlib.sha256(json.dumps(params.dataset_key(), sort_keys=True).encode()).hexdigest()


def _store_inputs(settings: Settings, session: Session, params: job_functions.DatasetParams, pairs: list[dict]):
    """Rows of the model, transcoder and dataset a job ran on (created when new)."""
    from backend.models.registry import MODELS
    from backend.models.transcoder_files import transcoder_summary
    from backend.models.transcoder_registry import resolve_transcoder
    spec = MODELS.get(params.model)
    model = queries.get_or_create_model(session, params.model, spec.architecture if spec else "")
    _, path = resolve_transcoder(params.transcoder, settings, allow_paths=False)
    transcoder = queries.get_or_create_transcoder(session, params.transcoder, model, transcoder_summary(path))
    dataset = queries.get_or_create_dataset(session, _dataset_hash(params), model, params.task,
                                            dict(params.task_options), params.n, params.seed, pairs)
    return model, transcoder, dataset


def _check_pie(settings: Settings, session: Session, params: Any) -> None:
    job_functions.check_names(settings, params)


def _run_prune(context, sessions, params, progress):
    return job_functions.run_prune(context, params, progress)


def _store_prune(settings, session, params, output) -> dict[str, int]:
    model, transcoder, dataset = _store_inputs(settings, session, params, output.pairs)
    h = job_functions.params_hash("prune", params)
    return {"circuit_id": queries.save_circuit(session, output.result, h, model, transcoder, dataset).id}


def _run_sweep(context, sessions, params, progress):
    return job_functions.run_sweep(context, params, progress)


def _store_sweep(settings, session, params, output) -> dict[str, int]:
    model, transcoder, dataset = _store_inputs(settings, session, params, output.pairs)
    h = job_functions.params_hash("sweep", params)
    return {"sweep_id": queries.save_sweep(session, output.result, h, model, transcoder, dataset).id}


def _check_graph(settings: Settings, session: Session, params: job_functions.GraphParams) -> None:
    row = queries.get_circuit(session, params.circuit_id)
    if params.prompt is not None and params.prompt >= row.n_prompts:
        raise UserError(f"prompt {params.prompt} out of range: circuit {row.id} has {row.n_prompts} prompts")
    if row.dataset_id is None:
        raise UserError(f"circuit {row.id} has no stored dataset to rebuild its prompts from")


def _run_graph(context, sessions, params: job_functions.GraphParams, progress):
    with sessions() as session:
        row = queries.get_circuit(session, params.circuit_id)
        dataset = queries.get_dataset(session, row.dataset_id)
        circuit = queries.circuit_result(row)
        inputs = job_functions.DatasetParams(model=row.model.name, transcoder=row.transcoder.name,
                                             task=dataset.task, task_options=dataset.task_options,
                                             n=dataset.n, seed=dataset.seed)
    return job_functions.run_graph(context, circuit, inputs, params.prompt, progress, params.target)


def _store_graph(settings, session, params: job_functions.GraphParams, output) -> dict[str, int]:
    queries.set_circuit_graph(session, params.circuit_id, params.prompt, output.result, params.target)
    return {"circuit_id": params.circuit_id}


def _check_interp(settings: Settings, session: Session, params: Any) -> None:
    """The circuit (kept features, the prompt in range) or the feature exists; an LLM
    explainer/rater needs a configured endpoint."""
    if params.feature_id is not None:
        queries.get_feature(session, params.feature_id)
    else:
        row = queries.get_circuit(session, params.circuit_id)
        if not row.features:
            raise UserError(f"circuit {row.id} kept no features to interpret")
        if params.prompt is not None and params.prompt >= row.n_prompts:
            raise UserError(f"prompt {params.prompt} out of range: circuit {row.id} has {row.n_prompts} prompts")
    uses_llm = (params.explainer == "llm" if isinstance(params, job_functions.ExplainParams)
                else params.rater == "llm")  # a ScoreParams' `explainer` only picks which explanations
    if uses_llm:
        from backend.interp.llm import LLMConfig
        LLMConfig.from_settings(settings)


def _run_explain(context, sessions, params: job_functions.ExplainParams, progress):
    from backend.store.interp import InterpStore
    return job_functions.run_explain(context, params, InterpStore(sessions), progress)


def _run_score(context, sessions, params: job_functions.ScoreParams, progress):
    from backend.store.interp import InterpStore
    return job_functions.run_score(context, params, InterpStore(sessions), progress)


def _store_interp(settings, session, params, output) -> dict[str, int]:
    """Statistics, examples, explanations and scores were stored as they came; the cost goes on the
    circuit (a one-feature job has no circuit to charge)."""
    from backend.store.interp import add_circuit_cost
    if params.circuit_id is None:
        return {}
    add_circuit_cost(session, params.circuit_id, output.result["cost"])
    return {"circuit_id": params.circuit_id}


def _check_edges(settings: Settings, session: Session, params: Any) -> None:
    job_functions.check_edge_names(settings, params)


def _edge_inputs(session: Session, params: job_functions.EdgeDatasetParams, pairs: list[dict]):
    from backend.models.registry import MODELS
    spec = MODELS.get(params.model)
    model = queries.get_or_create_model(session, params.model, spec.architecture if spec else "")
    key = hashlib.sha256(json.dumps(params.dataset_key(), sort_keys=True).encode()).hexdigest()
    dataset = queries.get_or_create_dataset(session, key, model, params.task, dict(params.task_options),
                                            params.n, params.seed, pairs)
    return model, dataset


def _store_edges(settings, session, params, output) -> dict[str, int]:
    model, dataset = _edge_inputs(session, params, output.pairs)
    h = job_functions.params_hash("edges", params)
    return {"edge_circuit_id": queries.save_edge_circuit(session, output.result, h, model, dataset).id}


def _store_edge_sweep(settings, session, params, output) -> dict[str, int]:
    model, dataset = _edge_inputs(session, params, output.pairs)
    h = job_functions.params_hash("edge-sweep", params)
    return {"edge_sweep_id": queries.save_edge_sweep(session, output.result, h, model, dataset).id}


EDGE_KINDS: dict[str, JobKind] = {
    "edges": JobKind(job_functions.EdgeParams, _check_edges,
                     lambda context, sessions, params, progress: job_functions.run_edges(context, params, progress),
                     _store_edges, job_functions.normalise_edges),
    "edge-sweep": JobKind(job_functions.EdgeSweepParams, _check_edges,
                          lambda context, sessions, params, progress: job_functions.run_edge_sweep(context, params, progress),
                          _store_edge_sweep, job_functions.normalise_edges),
}


def _run_hagd(context, sessions, params, progress):
    return job_functions.run_hagd(context, params, progress)


def _store_hagd(settings, session, params, output) -> dict[str, int]:
    model, transcoder, dataset = _store_inputs(settings, session, params, output.pairs)
    h = job_functions.params_hash("hagd", params)
    return {"hierarchy_id": queries.save_hierarchy(session, output.result, h, model, transcoder, dataset).id}


PIE_KINDS: dict[str, JobKind] = {
    "prune": JobKind(job_functions.PruneParams, _check_pie, _run_prune, _store_prune, job_functions.normalise),
    "sweep": JobKind(job_functions.SweepParams, _check_pie, _run_sweep, _store_sweep, job_functions.normalise),
    "graph": JobKind(job_functions.GraphParams, _check_graph, _run_graph, _store_graph),
    "explain": JobKind(job_functions.ExplainParams, _check_interp, _run_explain, _store_interp),
    "score": JobKind(job_functions.ScoreParams, _check_interp, _run_score, _store_interp),
    **EDGE_KINDS,
    "hagd": JobKind(job_functions.HagdParams, _check_pie, _run_hagd, _store_hagd, job_functions.normalise),
}


# ------------------------------------------------------------------------------ the executor

class JobExecutor:
    """Runs jobs in background threads: one worker thread (and queue) per device."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session],
                 kinds: dict[str, JobKind] | None = None, context: job_functions.JobContext | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.kinds = dict(PIE_KINDS if kinds is None else kinds)
        self.context = context or job_functions.JobContext(settings)
        self._queues: dict[str, queue.Queue[int | None]] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._cancel: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    # -- lifecycle

    def start(self) -> int:
        """Mark jobs a dead process left behind as failed; returns how many."""
        with transaction(self.sessions) as session:
            count = queries.mark_interrupted(session)
        if count:
            log.warning("marked %d interrupted job(s) as failed", count)
        return count

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the workers: running jobs stop at their next progress report."""
        self._stopping.set()
        with self._lock:
            for event in self._cancel.values():
                event.set()
            for q in self._queues.values():
                q.put(None)
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout)

    # -- requests

    def submit(self, kind: str, params: BaseModel | dict[str, Any]) -> tuple[Job, bool]:
        """Queue a job, or return the job these params already have. -> (job, reused).

        reused is True when the job is served from the store or already queued/running.
        """
        if kind not in self.kinds:
            raise UserError(f"unknown job kind '{kind}'; known kinds: {', '.join(self.kinds)}")
        spec = self.kinds[kind]
        params = spec.params.model_validate(params.model_dump() if isinstance(params, BaseModel) else params)
        params = spec.normalise(params)
        h = job_functions.params_hash(kind, params)
        with self._lock:
            for attempt in range(2):
                try:
                    job, reused = self._submit_locked(kind, spec, params, h)
                    break
                except IntegrityError:  # another process inserted the same hash: read its row
                    if attempt:
                        raise
        if not reused:
            self._enqueue(job.id, job.device)
        return job, reused

    def _submit_locked(self, kind: str, spec: JobKind, params: BaseModel, h: str) -> tuple[Job, bool]:
        with transaction(self.sessions) as session:
            job = queries.find_job_by_hash(session, h)
            if job is not None and (job.status in queries.ACTIVE or
                                    (job.status == "done" and queries.job_result_exists(session, job))):
                return job, True
            spec.check(self.settings, session, params)
            if job is None:
                job = queries.create_job(session, kind, params.model_dump(mode="json"), h, self.settings.device)
            else:
                queries.requeue_job(job)
            self._cancel[job.id] = threading.Event()
            session.flush()
            return job, False

    def cancel(self, job_id: int) -> Job:
        """Cancel a job: queued -> cancelled at once; running -> stops at its next progress report.

        A job that already ended (done, failed, cancelled) -> ConflictError (409).
        """
        with transaction(self.sessions) as session:
            job = queries.get_job(session, job_id)
            if job.status not in queries.ACTIVE:
                raise ConflictError(f"job {job_id} is already {job.status}: only a queued or running job "
                                    "can be cancelled")
            if not queries.cancel_queued_job(session, job_id):  # running (or it has just started)
                with self._lock:
                    event = self._cancel.get(job_id)
                if event is not None:
                    event.set()
                queries.set_job_progress(session, job_id, job.progress, "cancelling")
        with self.sessions() as session:
            return queries.get_job(session, job_id)

    # -- workers

    def _enqueue(self, job_id: int, device: str) -> None:
        with self._lock:
            if device not in self._queues:
                self._queues[device] = queue.Queue()
                thread = threading.Thread(target=self._work, args=(device,), name=f"piescope-jobs-{device}",
                                          daemon=True)
                self._threads[device] = thread
                thread.start()
            self._queues[device].put(job_id)

    def _work(self, device: str) -> None:
        q = self._queues[device]
        while not self._stopping.is_set():
            job_id = q.get()
            if job_id is None:
                return
            try:
                self._run(job_id)
            except Exception:  # never let one job take the worker down
                log.exception("job %d: the executor failed", job_id)
            finally:
                with self._lock:
                    self._cancel.pop(job_id, None)

    def _progress(self, job_id: int, cancel: threading.Event) -> job_functions.Progress:
        last = [0.0]

        def report(fraction: float, message: str) -> None:
            if cancel.is_set():
                raise Cancelled(f"job {job_id} cancelled")
            now = time.monotonic()
            if now - last[0] < PROGRESS_INTERVAL and fraction < 1.0:
                return
            last[0] = now
            with transaction(self.sessions) as session:
                queries.set_job_progress(session, job_id, fraction, redact(message, self.settings))

        return report

    def _run(self, job_id: int) -> None:
        with self._lock:
            cancel = self._cancel.setdefault(job_id, threading.Event())
        with transaction(self.sessions) as session:
            if not queries.set_job_running(session, job_id):
                return  # cancelled while queued
            job = queries.get_job(session, job_id)
            kind, raw = job.kind, dict(job.params)
        spec = self.kinds[kind]
        log.info("job %d (%s) started", job_id, kind)
        try:
            params = spec.params.model_validate(raw)
            output = spec.run(self.context, self.sessions, params, self._progress(job_id, cancel))
            with transaction(self.sessions) as session:
                ids = spec.store(self.settings, session, params, output)
                queries.finish_job(session, job_id, "done", message="done", **ids)
            log.info("job %d (%s) done", job_id, kind)
        except Cancelled:
            status, reason = ("failed", SHUTDOWN) if self._stopping.is_set() else ("cancelled", None)
            self._finish(job_id, status, reason or "cancelled", reason)
        except UserError as err:
            log.info("job %d (%s) failed: %s", job_id, kind, err)
            self._finish(job_id, "failed", str(err), str(err))
        except Exception as err:
            log.exception("job %d (%s) raised", job_id, kind)
            text = f"{type(err).__name__}: {err}"
            self._finish(job_id, "failed", text, text)

    def _finish(self, job_id: int, status: str, message: str, error: str | None) -> None:
        """End a job; its reason is stored without server paths (clients read it)."""
        message = redact(message, self.settings)
        error = None if error is None else redact(error, self.settings)
        with transaction(self.sessions) as session:
            queries.finish_job(session, job_id, status, message=message, error=error)
