"""The dashboard's only way to data: a small HTTP client of the PIEscope worker API.

The Dash app builds one `ApiClient` from settings (`api_url`, `api_token`) and keeps it in the
Flask config; page callbacks reach it with `current_client()`. Writes carry
`Authorization: Bearer <api_token>` when a token is set. Every non-2xx answer raises `ApiError`
with the API's `detail` message, which pages show as text.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import httpx

CONFIG_KEY = "PIESCOPE_API_CLIENT"


class ApiError(Exception):
    """A failed API call: HTTP status (0 when the API could not be reached) and its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ApiClient:
    """Typed-ish wrappers over the worker API's endpoints.

    Circuit details (which hold whole graphs) are cached by id for the life of the process
    (`cache_size` most recent); `circuit(id, fresh=True)` refetches, e.g. after a graph job.
    """

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 30.0,
                 cache_size: int = 8, transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers, transport=transport)
        self._circuits: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._hierarchies: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                json: Any = None) -> Any:
        """One call; returns the decoded JSON body, raises ApiError on failure."""
        clean = {k: v for k, v in (params or {}).items() if v is not None and v != ""}
        try:
            response = self._http.request(method, path, params=clean or None, json=json)
        except httpx.HTTPError as err:
            raise ApiError(0, f"the PIEscope API at {self.base_url} did not answer: {err}") from None
        if response.status_code >= 400:
            raise ApiError(response.status_code, _detail(response))
        return response.json() if response.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, json=body)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, json=body)

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ listings for forms

    def models(self) -> list[dict[str, Any]]:
        return self.get("/api/models")

    def tasks(self) -> list[dict[str, Any]]:
        return self.get("/api/tasks")

    def methods(self) -> list[dict[str, Any]]:
        return self.get("/api/methods")

    def transcoders(self) -> list[dict[str, Any]]:
        return self.get("/api/transcoders")

    def interpreters(self) -> dict[str, list[dict[str, Any]]]:
        """{"explainers": [...], "raters": [...]} the worker offers (llm only when configured)."""
        return self.get("/api/interpreters")

    # ------------------------------------------------------------------ results

    def circuits(self, **filters: Any) -> dict[str, Any]:
        """A page of circuit summaries; filters: model, transcoder, task, method, k, limit, offset."""
        return self.get("/api/circuits", **filters)

    def circuit(self, circuit_id: int, *, fresh: bool = False) -> dict[str, Any]:
        """The circuit with its prompts, features and graphs (cached unless `fresh`)."""
        circuit_id = int(circuit_id)
        with self._lock:
            if not fresh and circuit_id in self._circuits:
                self._circuits.move_to_end(circuit_id)
                return self._circuits[circuit_id]
        data = self.get(f"/api/circuits/{circuit_id}")
        with self._lock:
            self._circuits[circuit_id] = data
            self._circuits.move_to_end(circuit_id)
            while len(self._circuits) > self._cache_size:
                self._circuits.popitem(last=False)
        return data

    def sweeps(self, **filters: Any) -> dict[str, Any]:
        return self.get("/api/sweeps", **filters)

    def sweep(self, sweep_id: int) -> dict[str, Any]:
        return self.get(f"/api/sweeps/{int(sweep_id)}")

    def edge_methods(self) -> list[dict[str, Any]]:
        return self.get("/api/edge-methods")

    def edge_circuits(self, **filters: Any) -> dict[str, Any]:
        """A page of edge circuit summaries; filters: model, task, method, limit, offset."""
        return self.get("/api/edge-circuits", **filters)

    def edge_circuit(self, circuit_id: int) -> dict[str, Any]:
        return self.get(f"/api/edge-circuits/{int(circuit_id)}")

    def edge_attention(self, circuit_id: int, head: str | None = None, patterns: bool = True) -> dict[str, Any]:
        """The circuit's heads' attention on its first prompts (one head, or summaries only)."""
        return self.get(f"/api/edge-circuits/{int(circuit_id)}/attention", head=head,
                        patterns=None if patterns else "false")

    def edge_sweeps(self, **filters: Any) -> dict[str, Any]:
        return self.get("/api/edge-sweeps", **filters)

    def edge_sweep(self, sweep_id: int) -> dict[str, Any]:
        return self.get(f"/api/edge-sweeps/{int(sweep_id)}")

    def task_overview(self, model: str, task: str) -> dict[str, Any]:
        return self.get("/api/task-overview", model=model, task=task)

    def neuronpedia(self, circuit_id: int, key: str, prompt: int | None = None) -> dict[str, Any]:
        return self.get(f"/api/circuits/{int(circuit_id)}/graphs/{key}/neuronpedia", prompt=prompt)

    def subgraph(self, circuit_id: int, key: str, node_ids: list[str], prompt: int | None = None) -> dict[str, Any]:
        """The Neuronpedia JSON of the subgraph of pinned `node_ids` (plus the target)."""
        return self.post(f"/api/circuits/{int(circuit_id)}/graphs/{key}/subgraph",
                         {"node_ids": list(node_ids), "prompt": prompt})

    def hierarchies(self, **filters: Any) -> dict[str, Any]:
        """A page of HAGD hierarchy summaries; filters: model, task, limit, offset."""
        return self.get("/api/hierarchies", **filters)

    def hierarchy(self, hierarchy_id: int) -> dict[str, Any]:
        """One HAGD run with its whole result (graph, tree, trace, circuit, verification); cached
        by id (a stored hierarchy never changes: a rerun replaces the row under a new id)."""
        hierarchy_id = int(hierarchy_id)
        with self._lock:
            if hierarchy_id in self._hierarchies:
                return self._hierarchies[hierarchy_id]
        data = self.get(f"/api/hierarchies/{hierarchy_id}")
        with self._lock:
            self._hierarchies[hierarchy_id] = data
            while len(self._hierarchies) > self._cache_size:
                self._hierarchies.popitem(last=False)
        return data

    def edge_circuit_list(self, **filters: Any) -> dict[str, Any]:
        return self.get("/api/edge-circuits", **filters)

    def edge_circuit_detail(self, circuit_id: int) -> dict[str, Any]:
        return self.get(f"/api/edge-circuits/{int(circuit_id)}")

    # ------------------------------------------------------------------ jobs

    def submit_job(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        return self.post("/api/jobs", {"kind": kind, "params": params})

    def job(self, job_id: int) -> dict[str, Any]:
        return self.get(f"/api/jobs/{int(job_id)}")

    def jobs(self, **filters: Any) -> dict[str, Any]:
        return self.get("/api/jobs", **filters)

    # ------------------------------------------------------------------ features, interpretation

    def feature(self, feature_id: int) -> dict[str, Any]:
        return self.get(f"/api/features/{int(feature_id)}")

    def lookup_feature(self, transcoder: str, layer: int, index: int) -> dict[str, Any]:
        return self.get("/api/features/lookup", transcoder=transcoder, layer=int(layer), index=int(index))

    def explanations_by_feature(self, transcoder: str, keys: list[tuple[int, int]],
                                max_lookups: int = 200) -> dict[tuple[int, int], dict[str, Any]]:
        """The current (newest) explanation of each (layer, index) in `keys` that has one.

        One call to the dashboard endpoint when the API has it; otherwise one feature lookup per
        key (at most `max_lookups`).
        """
        wanted = set(keys)
        try:
            rows = self.get("/api/dashboard/explanations", transcoder=transcoder)
        except ApiError as err:
            if err.status != 404:
                raise
            return self._explanations_one_by_one(transcoder, sorted(wanted)[:max_lookups])
        return {(r["layer"], r["index"]): r for r in rows if (r["layer"], r["index"]) in wanted}

    def _explanations_one_by_one(self, transcoder: str,
                                 keys: list[tuple[int, int]]) -> dict[tuple[int, int], dict[str, Any]]:
        found = {}
        for layer, index in keys:
            try:
                feature = self.lookup_feature(transcoder, layer, index)
            except ApiError as err:
                if err.status == 404:
                    continue
                raise
            if feature["explanations"]:
                newest = max(feature["explanations"], key=lambda e: e["updated_at"])
                found[(layer, index)] = {"layer": layer, "index": index, "feature_id": feature["id"],
                                         "explanation_id": newest["id"], "text": newest["text"],
                                         "source": newest["source"]}
        return found

    def create_explanation(self, feature_id: int, text: str, author: str = "") -> dict[str, Any]:
        return self.post(f"/api/features/{int(feature_id)}/explanations",
                         {"text": text, "source": "human", "author": author})

    def update_explanation(self, explanation_id: int, text: str, author: str = "") -> dict[str, Any]:
        """An edit by a person: the API keeps the previous text as a revision."""
        return self.patch(f"/api/explanations/{int(explanation_id)}",
                          {"text": text, "source": "human", "author": author})

    def scores(self, explanation_id: int) -> list[dict[str, Any]]:
        return self.get(f"/api/explanations/{int(explanation_id)}/scores")

    def explanation_annotations(self, explanation_id: int) -> list[dict[str, Any]]:
        return self.get(f"/api/explanations/{int(explanation_id)}/annotations")

    def feature_annotations(self, feature_id: int) -> list[dict[str, Any]]:
        return self.get(f"/api/features/{int(feature_id)}/annotations")

    def annotate(self, *, explanation_id: int | None = None, feature_id: int | None = None,
                 rating: int | None = None, label: str | None = None, comment: str | None = None,
                 author: str = "") -> dict[str, Any]:
        """Rate an explanation 0/1/2 (FADE) and/or label or comment it (or the feature itself)."""
        body = {"rating": rating, "label": label or None, "comment": comment or None, "author": author}
        if explanation_id is not None:
            return self.post(f"/api/explanations/{int(explanation_id)}/annotations", body)
        if feature_id is None:
            raise ValueError("annotate needs an explanation_id or a feature_id")
        return self.post(f"/api/features/{int(feature_id)}/annotations", body)

    def rate_example(self, explanation_id: int, label: str, rating: int, author: str = "") -> dict[str, Any]:
        """A new human rating (0/1/2) of one example for an explanation; `label` is "example:<rank>"."""
        return self.post(f"/api/explanations/{int(explanation_id)}/annotations",
                         {"rating": int(rating), "label": label, "author": author, "comment": ""})

    def update_annotation(self, annotation_id: int, **fields: Any) -> dict[str, Any]:
        """Change an annotation's rating, label or comment (given fields only)."""
        return self.patch(f"/api/annotations/{int(annotation_id)}", fields)


def _detail(response: httpx.Response) -> str:
    """The API's error message: `detail` (a string, or pydantic's list of errors)."""
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    if isinstance(detail, list):
        detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg', '')}" for d in detail)
    return f"HTTP {response.status_code}: {detail}"


def current_client() -> ApiClient:
    """The client of the Dash app serving the current request."""
    from flask import current_app
    return current_app.config[CONFIG_KEY]
