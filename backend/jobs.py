"""The job functions: what `prune`, `sweep`, `graph`, `explain`, `score` and `hagd` compute, for the CLI and the API.

Each kind has a pydantic params model (validated, defaults filled in, then hashed: identical
params map to one stored result) and a function `run_<kind>(context, params, progress)` that
loads the model and transcoder by name, builds the task's prompts and calls the PIE engine
(`backend.circuits.pipeline`, `backend.circuits.graph`). Storing results is the caller's job
(`backend.api.jobs` stores them through `backend.store.queries`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from backend.circuits.limits import DEFAULT_TOST_MARGIN, MAX_K
from backend.errors import InvalidParameterError
from backend.settings import Settings
from backend.store.tables import MAX_DB_INT

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

# Ranges accepted from clients (the CLI shares them). A request outside -> 422.
MAX_N = 1000
MAX_KS = 50
MAX_METHODS = 20
MAX_BATCH_SIZE = 256
MAX_RANDOM_SEEDS = 20
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
TRANSCODER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}/[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
OptionValue = str | int | float | bool | None


def _no_path_options(options: dict[str, Any]) -> dict[str, Any]:
    """Task options are scalars; a file path option (the jsonl task's `path`) is CLI-only."""
    if "path" in options:
        raise ValueError("task option 'path' (a file on the server) is not accepted here; "
                         "use the CLI for the jsonl task")
    return options


class PromptParams(BaseModel):
    """Which prompts: model (its tokenizer decides which pairs fit), task, options, n, seed."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(pattern=NAME_PATTERN, description="model name (GET /api/models); never a path")
    task: str = Field(pattern=NAME_PATTERN, description="task name (GET /api/tasks)")
    task_options: dict[str, OptionValue] = Field(default_factory=dict)
    n: int = Field(32, ge=1, le=MAX_N, description="number of prompt pairs")
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @field_validator("task_options")
    @classmethod
    def _check_task_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        return _no_path_options(options)

    def dataset_key(self) -> dict[str, Any]:
        """What identifies the prompts (for the datasets table)."""
        return {"model": self.model, "task": self.task, "task_options": self.task_options,
                "n": self.n, "seed": self.seed}


class DatasetParams(PromptParams):
    """The prompts of a feature job, and the model's transcoder."""

    model_config = ConfigDict(allow_inf_nan=False)

    transcoder: str = Field(pattern=TRANSCODER_PATTERN, description="<model>/<dir> (GET /api/transcoders)")


class PruneParams(DatasetParams):
    """One circuit: keep K occurrences per prompt chosen by `method` (DESIGN 5)."""

    method: str = Field(pattern=NAME_PATTERN, description="selection method (GET /api/methods)")
    k: int = Field(ge=1, le=MAX_K)
    budget: str = Field("global", pattern=NAME_PATTERN)
    corruption: str = Field("corrupted_prompt", pattern=NAME_PATTERN)
    grad: Literal["replacement", "full"] = "replacement"
    options: dict[str, OptionValue] = Field(default_factory=dict)
    batch_size: int = Field(16, ge=1, le=MAX_BATCH_SIZE)
    all_token_kl: bool = True
    completeness: bool = True


class SweepParams(DatasetParams):
    """KL-vs-K of several methods on the same prompts."""

    methods: list[str] = Field(min_length=1, max_length=MAX_METHODS)
    ks: list[int] = Field(min_length=1, max_length=MAX_KS)
    budget: str = Field("global", pattern=NAME_PATTERN)
    corruption: str = Field("corrupted_prompt", pattern=NAME_PATTERN)
    grad: Literal["replacement", "full"] = "replacement"
    options: dict[str, dict[str, OptionValue]] = Field(default_factory=dict, description="per method")
    random_seeds: int = Field(3, ge=1, le=MAX_RANDOM_SEEDS)
    random_curve: bool = True
    batch_size: int = Field(16, ge=1, le=MAX_BATCH_SIZE)
    all_token_kl: bool = False
    completeness: bool = True
    tost_margin: float = Field(DEFAULT_TOST_MARGIN, gt=0, le=10,
                               description="equivalence margin of the effective-budget TOST (nats of last-token KL)")

    @field_validator("methods")
    @classmethod
    def _dedupe_methods(cls, methods: list[str]) -> list[str]:
        for m in methods:
            if not re.fullmatch(NAME_PATTERN, m):
                raise ValueError(f"method {m!r} is not a method name")
        return list(dict.fromkeys(methods))

    @field_validator("ks")
    @classmethod
    def _sorted_ks(cls, ks: list[int]) -> list[int]:
        for k in ks:
            if not 1 <= k <= MAX_K:
                raise ValueError(f"every K must be in 1..{MAX_K}, got {k}")
        return sorted(set(ks))


class GraphParams(BaseModel):
    """The attribution graph of a stored circuit, on one prompt or (None) on all of them."""

    model_config = ConfigDict(extra="forbid")

    circuit_id: int = Field(ge=1, le=MAX_DB_INT)
    prompt: int | None = Field(None, ge=0, le=MAX_N)
    target: Literal["metric", "logit"] = Field(
        "metric", description="what the graph explains: the task metric M (e.g. logit(IO) - logit(S)) or the answer logit")


class HagdParams(DatasetParams):
    """HAGD on n prompts (DESIGN 8.3): options are `backend.hagd.pipeline.HagdConfig`'s fields,
    except `scorer_path` (a file on the server; score "scorer" uses models_cache/hagd/scorer.pt)
    and `seed` (the dataset's seed is HAGD's)."""

    options: dict[str, OptionValue] = Field(default_factory=dict)


CORPORA: tuple[str, ...] = ("default", "stories")


class InterpTarget(BaseModel):
    """Which features to interpret: a stored circuit's (all, its top N, or those kept on one
    prompt), or one stored feature (`feature_id`, the dashboard's feature page)."""

    model_config = ConfigDict(extra="forbid")

    circuit_id: int | None = Field(None, ge=1, le=MAX_DB_INT)
    feature_id: int | None = Field(None, ge=1, le=MAX_DB_INT, description="one stored feature instead of a circuit's")
    prompt: int | None = Field(None, ge=0, le=MAX_N,
                               description="with circuit_id: only the features kept on this prompt")

    @model_validator(mode="after")
    def _one_target(self):
        if (self.circuit_id is None) == (self.feature_id is None):
            raise ValueError("give exactly one of circuit_id and feature_id")
        if self.prompt is not None and self.circuit_id is None:
            raise ValueError("prompt selects a circuit's features: it needs circuit_id")
        return self


class ExplainParams(InterpTarget):
    """Harvest and explain the features of a stored circuit, or one feature (DESIGN 7)."""

    explainer: Literal["offline", "llm"] = "offline"
    top_n: int | None = Field(None, ge=1, le=MAX_K, description="the circuit's top features; all when unset")
    corpus: Literal["default", "stories"] = Field("default", description="default: Python docs + stories")
    corpus_tokens: int = Field(20_000, ge=100, le=5_000_000, description="corpus tokens budget of the harvest")
    force: bool = Field(False, description="explain again features already explained by this explainer")


class ScoreParams(InterpTarget):
    """FADE scores of the explanations of a stored circuit's features, or one feature's (DESIGN 7).

    Texts come from held-out corpus documents only (never what the explainer saw); the
    faithfulness defaults are 8 prompts x 16 new tokens per steering factor."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    explainer: Literal["offline", "llm", "human", "any"] = Field("any", description="which explanations")
    rater: Literal["offline", "llm"] = "offline"
    top_n: int | None = Field(None, ge=1, le=MAX_K)
    corpus: Literal["default", "stories"] = "default"
    corpus_tokens: int = Field(20_000, ge=100, le=5_000_000)
    n_natural: int = Field(20, ge=2, le=500, description="random corpus windows (natural texts)")
    n_generated: int = Field(10, ge=2, le=100, description="texts written to express each concept")
    faithfulness: bool = True
    factors: list[float] = Field(default_factory=lambda: [-50.0, -10.0, 0.0, 10.0, 50.0], min_length=2, max_length=20)
    n_steer_prompts: int = Field(8, ge=1, le=32, description="held-out prompts steered per factor")
    n_new_tokens: int = Field(16, ge=1, le=64, description="greedy tokens generated per steered prompt")

    @field_validator("factors")
    @classmethod
    def _factors_with_baseline(cls, factors: list[float]) -> list[float]:
        factors = sorted(set(factors))
        if 0.0 not in factors:
            raise ValueError("steering factors must include 0 (the unsteered baseline)")
        if len(factors) < 2:
            raise ValueError("steering factors need at least one value besides the 0 baseline")
        return factors


def params_hash(kind: str, params: BaseModel) -> str:
    """sha256 of the canonical JSON of (kind, normalised params): identical requests, one hash."""
    canonical = json.dumps({"kind": kind, "params": params.model_dump(mode="json")},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def list_methods() -> list[dict[str, Any]]:
    """The one registry of selection methods (name, description, options)."""
    from backend.circuits.selection import list_methods as registry
    return list(registry())


def normalise(params: BaseModel) -> BaseModel:
    """Fill in the methods' default options so that equal requests hash equal.

    Unknown method -> NotFoundError (404); unknown budget, corruption or option ->
    InvalidParameterError (422), at request time rather than after the model has loaded.
    """
    from backend.circuits.attribution import CORRUPTIONS
    from backend.circuits.pipeline import check_method
    if isinstance(params, (PruneParams, SweepParams)) and params.corruption not in CORRUPTIONS:
        raise InvalidParameterError(f"unknown corruption '{params.corruption}'; known: {', '.join(CORRUPTIONS)}")
    if isinstance(params, PruneParams):
        return params.model_copy(update={"options": check_method(params.method, params.budget, params.options)})
    if isinstance(params, SweepParams):
        extra = set(params.options) - set(params.methods)
        if extra:
            raise InvalidParameterError(f"options given for method(s) not in the sweep: {', '.join(sorted(extra))}")
        options = {m: check_method(m, params.budget, params.options.get(m)) for m in params.methods}
        return params.model_copy(update={"options": options})
    if isinstance(params, HagdParams):
        from dataclasses import asdict

        from backend.hagd.pipeline import HagdConfig
        if "scorer_path" in params.options:
            raise InvalidParameterError("option 'scorer_path' (a file on the server) is not accepted here; "
                                        "score 'scorer' uses the built scorer (piescope hagd-scorer)")
        if "seed" in params.options:
            raise InvalidParameterError("HAGD takes the dataset's seed; set params.seed, not options.seed")
        options = asdict(HagdConfig.from_options({**params.options, **(
            {"scorer_path": "built"} if params.options.get("score") == "scorer" else {})}))
        options.pop("scorer_path")
        options.pop("seed")
        return params.model_copy(update={"options": options})
    return params


def check_names(settings: Settings, params: BaseModel) -> None:
    """Cheap existence checks before queueing: model, transcoder (and that it is the model's), task.

    NotFoundError (404) for an unknown name, InvalidParameterError (422) for a mismatch or a bad
    task option. Nothing is loaded; no path from the request is ever opened.
    """
    if not isinstance(params, DatasetParams):
        return
    from backend.models.loading import locate
    from backend.models.transcoder_registry import resolve_transcoder
    from backend.tasks import get_task
    locate(params.model, settings, allow_paths=False)
    resolve_transcoder(params.transcoder, settings, allow_paths=False)
    owner = params.transcoder.split("/", 1)[0]
    if owner != params.model:
        raise InvalidParameterError(f"transcoder '{params.transcoder}' belongs to model '{owner}', "
                                    f"not '{params.model}'")
    get_task(params.task, **params.task_options)


class LRU:
    """A small thread-safe least-recently-used cache: name -> loaded object."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = load()  # outside the lock: loading a model takes seconds
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


@dataclass
class JobContext:
    """Settings plus the in-process caches of loaded models and transcoders (by name)."""

    settings: Settings
    models: LRU = field(default_factory=lambda: LRU(2))
    transcoders: LRU = field(default_factory=lambda: LRU(2))

    def adapter(self, name: str):
        from backend.models.loading import load_model
        return self.models.get(name, lambda: load_model(name, self.settings, allow_paths=False))

    def transcoder(self, name: str):
        from backend.models.transcoder_files import load_transcoder
        from backend.models.transcoder_registry import resolve_transcoder
        tc_name, path = resolve_transcoder(name, self.settings, allow_paths=False)
        return self.transcoders.get(tc_name, lambda: load_transcoder(path, device=self.settings.device))


@dataclass
class JobOutput:
    """A job's result and the prompt pairs it ran on (for the datasets table)."""

    result: Any
    pairs: list[dict[str, Any]]


def _pairs_json(batch) -> list[dict[str, Any]]:
    return [{"clean": p.clean, "corrupted": p.corrupted, "answer": p.answer,
             "distractors": list(p.distractors)} for p in batch.pairs]


def prepare(context: JobContext, params: DatasetParams, progress: Progress | None = None):
    """(adapter, transcoder, batch) for the dataset part of `params`."""
    from backend.tasks import get_task
    say = progress or (lambda f, m: None)
    say(0.0, f"loading model {params.model}")
    adapter = context.adapter(params.model)
    say(0.0, f"loading transcoder {params.transcoder}")
    transcoder = context.transcoder(params.transcoder)
    batch = get_task(params.task, **params.task_options).build(adapter.tokenizer, params.n, params.seed)
    if len(batch) == 0:
        raise InvalidParameterError(f"no prompt pair of task '{params.task}' fits the tokenizer of "
                                    f"'{params.model}' (dropped: {batch.dropped})")
    return adapter, transcoder, batch


def prune_config(params: PruneParams):
    from backend.circuits.pipeline import PruneConfig
    return PruneConfig(method=params.method, k=params.k, budget=params.budget, corruption=params.corruption,
                       grad=params.grad, options=dict(params.options), seed=params.seed,
                       batch_size=params.batch_size, all_token_kl=params.all_token_kl,
                       completeness=params.completeness)


def sweep_config(params: SweepParams):
    from backend.circuits.pipeline import SweepConfig
    return SweepConfig(methods=list(params.methods), ks=list(params.ks), budget=params.budget,
                       corruption=params.corruption, grad=params.grad,
                       options={m: dict(o) for m, o in params.options.items()}, seed=params.seed,
                       random_seeds=params.random_seeds, random_curve=params.random_curve,
                       batch_size=params.batch_size, all_token_kl=params.all_token_kl,
                       completeness=params.completeness, tost_margin=params.tost_margin)


def run_prune(context: JobContext, params: PruneParams, progress: Progress | None = None) -> JobOutput:
    """Prune one circuit -> JobOutput(Circuit, pairs)."""
    from backend.circuits import pipeline
    adapter, transcoder, batch = prepare(context, params, progress)
    circuit = pipeline.run_prune(adapter, transcoder, batch, prune_config(params), model_name=params.model,
                                 transcoder_name=params.transcoder, task_name=params.task, progress=progress)
    return JobOutput(circuit, _pairs_json(batch))


def run_sweep(context: JobContext, params: SweepParams, progress: Progress | None = None) -> JobOutput:
    """Sweep methods x K -> JobOutput(SweepResult, pairs), in this process or (PIESCOPE_EXECUTOR=ray)
    as shards on Ray actors."""
    from backend.circuits import pipeline
    if context.settings.executor == "ray":
        from backend.executors.ray_executor import run_sweep as run_on_ray
        result, info = run_on_ray(context.settings, _ray_inputs(params), sweep_config(params), progress=progress,
                                  model_name=params.model, transcoder_name=params.transcoder)
        return JobOutput(result, info["pairs"])
    adapter, transcoder, batch = prepare(context, params, progress)
    result = pipeline.run_sweep(adapter, transcoder, batch, sweep_config(params), model_name=params.model,
                                transcoder_name=params.transcoder, task_name=params.task, progress=progress)
    return JobOutput(result, _pairs_json(batch))


def run_graph(context: JobContext, circuit, dataset: DatasetParams, prompt: int | None,
              progress: Progress | None = None, target: str = "metric") -> JobOutput:
    """The attribution graphs (stored graph JSON) of `circuit` (a results.Circuit) on its prompts.

    `dataset` rebuilds exactly the prompts the circuit was pruned on; `target` is "metric" or "logit".
    """
    from backend.circuits.graph_attribution import build_graph
    if prompt is not None and prompt >= len(circuit.prompts):
        raise InvalidParameterError(f"prompt {prompt} out of range: the circuit has {len(circuit.prompts)} prompts")
    adapter, transcoder, batch = prepare(context, dataset, progress)
    if progress:
        progress(0.1, "building the attribution graph")
    graph = build_graph(adapter, transcoder, batch, circuit, [prompt] if prompt is not None else None,
                        progress=(lambda f, m: progress(0.1 + 0.9 * f, m)) if progress else None, target=target)
    return JobOutput(graph, _pairs_json(batch))


def scorer_file(settings: Settings):
    """Where `piescope hagd-scorer` puts the learned cluster scorer by default."""
    from pathlib import Path
    return Path(settings.models_cache) / "hagd" / "scorer.pt"


def run_hagd(context: JobContext, params: HagdParams, progress: Progress | None = None) -> JobOutput:
    """HAGD -> JobOutput(HagdResult JSON, pairs); its verification prompt sets on Ray actors when
    PIESCOPE_EXECUTOR=ray (the search runs here)."""
    from backend.hagd.pipeline import HagdConfig
    from backend.hagd.pipeline import run_hagd as hagd
    from backend.tasks import get_task
    options = dict(params.options)
    if options.get("score") == "scorer":
        options["scorer_path"] = str(scorer_file(context.settings))
    config = HagdConfig.from_options({**options, "seed": params.seed})
    adapter, transcoder, batch = prepare(context, params, progress)
    task = get_task(params.task, **params.task_options)
    with _verify_map(context.settings, params, config) as verify_map:
        result = hagd(adapter, transcoder, task, params.n, config, model_name=params.model,
                      transcoder_name=params.transcoder, task_name=params.task, progress=progress,
                      verify_map=verify_map)
    return JobOutput(result.to_json(), _pairs_json(batch))


def _verify_map(settings: Settings, params: HagdParams, config):
    """HAGD's verification prompt sets: on Ray actors (PIESCOPE_EXECUTOR=ray), else None (here)."""
    from contextlib import nullcontext
    if settings.executor != "ray":
        return nullcontext(None)
    from backend.executors.ray_executor import task_map
    return task_map(settings, _ray_inputs(params), config)


def _ray_inputs(params: PromptParams):
    """What a Ray worker loads for `params` (an edge job's have no transcoder)."""
    from backend.executors.ray_executor import SweepInputs
    return SweepInputs(params.model, getattr(params, "transcoder", None), params.task, dict(params.task_options),
                       params.n, params.seed)


# ------------------------------------------------------------------------------ interpretation

def corpus_documents(name: str, seed: int = 0) -> list[str]:
    """The harvest corpus: "default" (Python docs + stories) or "stories" (IOI-like stories only)."""
    from backend.models.corpus import load_corpus, story_documents
    if name == "stories":
        return story_documents(400_000, seed=seed)
    return load_corpus(None, seed=seed)


def _targets(store, params: InterpTarget, top_n: int | None):
    """(circuit info or None, model, transcoder, features) that an explain/score job works on."""
    if params.feature_id is not None:
        model, transcoder, key = store.feature(params.feature_id)
        return None, model, transcoder, [key]
    info = store.circuit(params.circuit_id)
    if params.prompt is not None and params.prompt >= len(info.prompt_features):
        raise InvalidParameterError(f"prompt {params.prompt} out of range: circuit {info.id} has "
                                    f"{len(info.prompt_features)} prompts")
    return info, info.model, info.transcoder, info.features_of(params.prompt, top_n)


def interpreters(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """The explainers and raters this worker can use: offline always, llm only when
    PIESCOPE_LLM_BASE_URL and PIESCOPE_LLM_MODEL are set."""
    from backend.interp.explainers import OFFLINE_MODEL
    from backend.interp.raters import OFFLINE_RATER, PROXY_NOTE
    explainers = [{"name": "offline", "model": OFFLINE_MODEL, "description": "a deterministic heuristic "
                   "(frequent highlighted tokens and logit lens), not a language model"}]
    raters = [{"name": "offline", "rater": OFFLINE_RATER, "proxy": True, "description": PROXY_NOTE}]
    if settings.llm_base_url and settings.llm_model:
        explainers.append({"name": "llm", "model": settings.llm_model, "description": "the configured endpoint"})
        raters.append({"name": "llm", "rater": f"llm:{settings.llm_model}", "proxy": False,
                       "description": "the configured endpoint"})
    return {"explainers": explainers, "raters": raters}


def _active_features(context: JobContext, info) -> int:
    """Distinct features active on the circuit's clean prompts: rebuilt from its stored dataset,
    else (a circuit imported from a file) tokenised from its prompt texts."""
    from backend.interp.pipeline import active_features, prompt_windows, text_windows
    if info.dataset is not None:
        adapter, transcoder, batch = prepare(context, DatasetParams(**info.dataset))
        return active_features(adapter, transcoder, prompt_windows(batch))
    adapter, transcoder = context.adapter(info.model), context.transcoder(info.transcoder)
    return active_features(adapter, transcoder, text_windows(adapter.tokenizer, info.prompts))


def run_explain(context: JobContext, params: ExplainParams, store, progress: Progress | None = None) -> JobOutput:
    """Harvest + explain a circuit's features (stored as they come through `store`, an
    `interp.store.InterpStore`) -> JobOutput({"report", "cost"}, [])."""
    from dataclasses import asdict

    from backend.interp.explainers import LLMExplainer, OfflineExplainer
    from backend.interp.harvest import HarvestConfig
    from backend.interp.llm import LLMClient, LLMConfig
    from backend.interp.pipeline import explain_circuit
    say = progress or (lambda f, m: None)
    info, model, transcoder_name, features = _targets(store, params, params.top_n)
    client = LLMClient(LLMConfig.from_settings(context.settings)) if params.explainer == "llm" else None
    explainer = LLMExplainer(client) if client else OfflineExplainer()
    adapter, transcoder = context.adapter(model), context.transcoder(transcoder_name)
    try:
        report = explain_circuit(adapter, transcoder, store, transcoder_name, features,
                                 corpus_documents(params.corpus), explainer, params.corpus,
                                 HarvestConfig(n_tokens=params.corpus_tokens), force=params.force,
                                 progress=lambda f, m: say(0.9 * f, m))
    finally:
        if client:
            client.close()
    cost = {"explainer": f"{explainer.source}:{explainer.model}", "explain_calls": report.calls,
            "explain_tokens": report.tokens, "explained_features": report.explained + report.reused}
    if info is not None:  # what explaining every active feature would have cost, instead of the circuit's
        active = info.cost.get("active_features")
        if active is None:
            say(0.9, "counting the features active on the circuit's prompts")
            active = _active_features(context, info)
        per_feature = report.calls / report.explained if report.explained else 1.0
        cost.update(active_features=active, calls_if_all_active=round(active * per_feature))
    say(1.0, f"explained {report.explained} features ({len(report.errors)} errors)")
    return JobOutput({"report": asdict(report), "cost": cost}, [])


def run_score(context: JobContext, params: ScoreParams, store, progress: Progress | None = None) -> JobOutput:
    """FADE-score a circuit's explanations (stored as they come) -> JobOutput({"report", "cost"}, [])."""
    from dataclasses import asdict

    from backend.interp.llm import LLMClient, LLMConfig
    from backend.interp.pipeline import ScoreConfig, score_circuit
    from backend.interp.raters import LLMRater, OfflineRater, is_proxy
    info, model, transcoder_name, features = _targets(store, params, params.top_n)
    client = LLMClient(LLMConfig.from_settings(context.settings)) if params.rater == "llm" else None
    rater = LLMRater(client) if client else OfflineRater()
    adapter, transcoder = context.adapter(model), context.transcoder(transcoder_name)
    config = ScoreConfig(n_natural=params.n_natural, n_generated=params.n_generated,
                         faithfulness=params.faithfulness, factors=tuple(params.factors),
                         n_steer_prompts=params.n_steer_prompts, n_new_tokens=params.n_new_tokens)
    try:
        report = score_circuit(adapter, transcoder, store, transcoder_name, features,
                               corpus_documents(params.corpus), rater, params.explainer, config, progress,
                               corpus=params.corpus)
    finally:
        if client:
            client.close()
    active = info.cost.get("active_features") if info is not None else None
    per_feature = report.calls / report.scored if report.scored else 0.0
    cost = {"rater": rater.name, "rater_proxy": is_proxy(rater.name), "score_calls": report.calls,
            "score_tokens": report.tokens, "scored_features": report.scored,
            "score_calls_if_all_active": None if active is None else round(active * per_feature)}
    return JobOutput({"report": asdict(report), "cost": cost}, [])


# ------------------------------------------------------------------------------ edge circuits (issue 12)

class EdgeDatasetParams(PromptParams):
    """Which prompts for an edge job (no transcoder), and the batch size of its forwards."""

    batch_size: int = Field(16, ge=1, le=MAX_BATCH_SIZE)


class EdgeParams(EdgeDatasetParams):
    """One edge circuit: `method` (GET /api/edge-methods) to an edge count or a sparsity."""

    method: str = Field(pattern=NAME_PATTERN)
    edges: int | None = Field(None, ge=1, le=10_000_000)
    sparsity: float | None = Field(None, ge=0.0, lt=1.0)
    options: dict[str, OptionValue] = Field(default_factory=dict)


class EdgeSweepParams(EdgeDatasetParams):
    """Edge methods over edge counts (default: 8 log-spaced counts up to the whole graph)."""

    methods: list[str] = Field(min_length=1, max_length=MAX_METHODS)
    edge_counts: list[int] | None = Field(None, min_length=1, max_length=MAX_KS)
    options: dict[str, dict[str, OptionValue]] = Field(default_factory=dict, description="per method")

    @field_validator("edge_counts")
    @classmethod
    def _sorted_counts(cls, counts: list[int] | None) -> list[int] | None:
        if counts is None:
            return None
        if any(c < 1 for c in counts):
            raise ValueError("every edge count must be >= 1")
        return sorted(set(counts))


def normalise_edges(params: BaseModel) -> BaseModel:
    """Fill in the edge methods' default options so that equal requests hash equal."""
    from backend.edges.registry import get_edge_method
    if isinstance(params, EdgeParams):
        if (params.edges is None) == (params.sparsity is None):
            raise InvalidParameterError("give exactly one of edges or sparsity")
        return params.model_copy(update={"options": get_edge_method(params.method).options(params.options)})
    assert isinstance(params, EdgeSweepParams)
    methods = list(dict.fromkeys(params.methods))
    extra = set(params.options) - set(methods)
    if extra:
        raise InvalidParameterError(f"options given for method(s) not in the sweep: {', '.join(sorted(extra))}")
    options = {m: get_edge_method(m).options(params.options.get(m)) for m in methods}
    return params.model_copy(update={"methods": methods, "options": options})


def check_edge_names(settings: Settings, params: EdgeDatasetParams) -> None:
    """The model and the task exist (nothing loaded)."""
    from backend.models.loading import locate
    from backend.tasks import get_task
    locate(params.model, settings, allow_paths=False)
    get_task(params.task, **params.task_options)


def _edge_batch(context: JobContext, params: EdgeDatasetParams, progress: Progress | None):
    from backend.tasks import get_task
    (progress or (lambda f, m: None))(0.0, f"loading model {params.model}")
    adapter = context.adapter(params.model)
    batch = get_task(params.task, **params.task_options).build(adapter.tokenizer, params.n, params.seed)
    if len(batch) == 0:
        raise InvalidParameterError(f"no prompt pair of task '{params.task}' fits the tokenizer of "
                                    f"'{params.model}' (dropped: {batch.dropped})")
    return adapter, batch


def run_edges(context: JobContext, params: EdgeParams, progress: Progress | None = None) -> JobOutput:
    from backend.edges.pipeline import EdgeConfig, run_edges as run
    adapter, batch = _edge_batch(context, params, progress)
    config = EdgeConfig(params.method, params.edges, params.sparsity, dict(params.options), params.seed,
                        params.batch_size)
    result = run(adapter, batch, config, model_name=params.model, task_name=params.task, progress=progress)
    return JobOutput(result, _pairs_json(batch))


def run_edge_sweep(context: JobContext, params: EdgeSweepParams, progress: Progress | None = None) -> JobOutput:
    """Edge methods x counts -> JobOutput(EdgeSweep, pairs), in this process or (PIESCOPE_EXECUTOR=ray)
    as points on Ray actors."""
    from backend.edges.pipeline import EdgeSweepConfig, run_edge_sweep as run
    config = EdgeSweepConfig(list(params.methods), params.edge_counts, {k: dict(v) for k, v in params.options.items()},
                             params.seed, params.batch_size)
    if context.settings.executor == "ray":
        from backend.executors.ray_executor import run_edge_sweep as run_on_ray
        result, info = run_on_ray(context.settings, _ray_inputs(params), config, progress=progress,
                                  model_name=params.model)
        return JobOutput(result, info["pairs"])
    adapter, batch = _edge_batch(context, params, progress)
    result = run(adapter, batch, config, model_name=params.model, task_name=params.task, progress=progress)
    return JobOutput(result, _pairs_json(batch))
