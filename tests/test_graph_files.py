"""Graph files through the API, the CLI and the dashboard: import (validated, size-limited, never
a server path), export (404 with a message when there is no graph), and a round trip."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from backend.api.app import create_app
from backend.circuits.graph import Graph
from backend.errors import InvalidParameterError
from backend.cli import main
from backend.store import queries
from backend.store.db import transaction
from tests.api_fixtures import TINY_CLT, TINY_MODEL, api_settings, tiny_cache  # noqa: F401 (fixtures)
from tests.browser import dash_stack, driver, severe_console_entries  # noqa: F401 (fixtures)
from tests.test_graph import HAND_WRITTEN, _mutated
from tests.test_store import make_circuit


@pytest.fixture
def client(api_settings):
    with TestClient(create_app(api_settings)) as c:
        yield c


def test_import_stores_a_circuit_that_exports_the_same_graph(client):
    response = client.post("/api/graphs/import", json=HAND_WRITTEN)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["graph_key"] == "0@logit" and body["nodes"] == 5 and body["links"] == 5
    circuit = client.get(f"/api/circuits/{body['circuit_id']}").json()
    assert circuit["method"] == "imported" and circuit["model"] == "gemma-2-2b" and circuit["kl_mean"] is None
    assert circuit["graph_keys"] == ["0@logit"] and circuit["prompts"][0]["kept"][0]["feature"] == 1234
    listed = client.get("/api/circuits").json()["items"][0]
    assert listed["id"] == body["circuit_id"] and listed["kl_ci95"] == [None, None]
    exported = client.get(f"/api/circuits/{body['circuit_id']}/graphs/0@logit/neuronpedia").json()
    assert Graph.from_neuronpedia(exported) == Graph.from_neuronpedia(HAND_WRITTEN)
    # Compare treats it as a circuit without KL.
    from frontend_dash.components.compare import feature_sets, kl_pairs
    assert kl_pairs(circuit, circuit) == [] and feature_sets(circuit, circuit)["shared"]
    # The same file again: the same row.
    assert client.post("/api/graphs/import", json=HAND_WRITTEN).json()["circuit_id"] == body["circuit_id"]


def test_a_subgraph_keeps_the_chosen_nodes_their_edges_and_the_target_and_imports_back(client):
    whole = Graph.from_neuronpedia(HAND_WRITTEN)
    features = [n.node_id for n in whole.nodes if n.kind == "feature"]
    keep = [features[0], next(n.node_id for n in whole.nodes if n.kind == "token")]
    sub = whole.subgraph(keep)
    target = whole.target.node_id
    assert sub.ids == [i for i in whole.ids if i in {*keep, target}]          # the graph's own order
    for s in sub.ids:                                                        # every weight as it was
        for t in sub.ids:
            assert sub.weight(s, t) == whole.weight(s, t)
    assert whole.subgraph(whole.ids) == whole
    with pytest.raises(InvalidParameterError, match="no node 'ghost'"):
        whole.subgraph(["ghost"])

    stored = client.post("/api/graphs/import", json=HAND_WRITTEN).json()
    url = f"/api/circuits/{stored['circuit_id']}/graphs/{stored['graph_key']}/subgraph"
    exported = client.post(url, json={"node_ids": keep})
    assert exported.status_code == 200, exported.text
    doc = exported.json()
    assert doc["qParams"]["pinnedIds"] == keep and Graph.from_neuronpedia(doc) == sub
    again = client.post("/api/graphs/import", json=doc)
    assert again.status_code == 201 and again.json()["nodes"] == 3
    for body, needle in (({"node_ids": ["ghost"]}, "ghost"), ({"node_ids": []}, "node_ids"),
                         ({"node_ids": keep, "prompt": 5}, "no prompt 5"), ({"node_ids": keep, "x": 1}, "x")):
        refused = client.post(url, json=body)
        assert refused.status_code in (404, 422) and needle in refused.text, (body, refused.text)


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 422, "not valid JSON"),  # refused by the request guard, before the route
    (b"[1, 2]", 422, "object"),
    (json.dumps(_mutated(links__0__target="ghost")).encode(), 422, "ghost"),
    (json.dumps({"metadata": {"prompt_tokens": ["a"]}, "nodes": [], "links": []}).encode(), 422, "nodes"),
    (json.dumps({"path": "/etc/passwd"}).encode(), 422, "metadata"),
])
def test_bad_graph_bodies_are_4xx_with_a_reason(client, body, status, message):
    response = client.post("/api/graphs/import", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status and message in response.json()["detail"]


def test_import_names_are_validated_and_bodies_limited(client):
    response = client.post("/api/graphs/import", params={"model": "../etc"}, json=HAND_WRITTEN)
    assert response.status_code == 422
    response = client.post("/api/graphs/import", params={"transcoder": "other/clt", "model": "gemma-2-2b"},
                           json=HAND_WRITTEN)
    assert response.status_code == 422 and "belongs to model" in response.json()["detail"]
    big = b" " * (33 << 20)
    assert client.post("/api/graphs/import", content=big).status_code == 413
    # Other routes keep the general limit.
    assert client.post("/api/jobs", content=b" " * (2 << 20)).status_code == 413


def test_exporting_a_circuit_without_a_graph_is_a_404_with_a_message(client):
    with transaction(client.app.state.sessions) as s:
        model = queries.get_or_create_model(s, TINY_MODEL)
        tc = queries.get_or_create_transcoder(s, TINY_CLT, model)
        circuit_id = queries.save_circuit(s, make_circuit("fap", 4), "9" * 64, model, tc, None).id
    for path in (f"/api/circuits/{circuit_id}/graphs/all/neuronpedia",
                 f"/api/circuits/{circuit_id}/graphs/0/neuronpedia?prompt=0",
                 f"/api/circuits/{circuit_id}/graphs/0@logit/neuronpedia"):
        response = client.get(path)
        assert response.status_code == 404 and "has no graph" in response.json()["detail"]
    assert client.get("/api/circuits/999/graphs/all/neuronpedia").status_code == 404


def test_cli_import_export_round_trip(api_settings, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIESCOPE_MODELS_CACHE", str(api_settings.models_cache))
    monkeypatch.setenv("PIESCOPE_DATA_DIR", str(api_settings.data_dir))
    source = tmp_path / "hand.json"
    source.write_text(json.dumps(HAND_WRITTEN))
    assert main(["graph", "import", str(source)]) == 0
    out = capsys.readouterr().out
    circuit_id = int(out.split("as circuit ")[1].split()[0])
    target = tmp_path / "out.json"
    assert main(["graph", "export", "--circuit", str(circuit_id), "--target", "logit", "--out", str(target)]) == 0
    assert Graph.from_neuronpedia(json.loads(target.read_text())) == Graph.from_neuronpedia(HAND_WRITTEN)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_mutated(nodes__2__feature_type="lorsa")))
    assert main(["graph", "import", str(bad)]) == 2
    assert "feature_type" in capsys.readouterr().err
    assert main(["graph", "export", "--circuit", str(circuit_id)]) == 2   # no metric graph
    assert "has no graph 'all'" in capsys.readouterr().err


def test_a_hand_written_graph_file_renders_on_the_circuit_page(dash_stack, driver):  # noqa: F811
    from tests.test_dashboard import _css, _open, _wait
    response = dash_stack.api.post("/api/graphs/import", json=HAND_WRITTEN)
    assert response.status_code == 201, response.text
    circuit_id = response.json()["circuit_id"]
    _open(driver, dash_stack, f"/circuit?id={circuit_id}&prompt=0", "#circuit-graph .scatterlayer .trace")
    _wait(driver, _css("#circuit-graph .xtick"))
    drawn = driver.execute_script(
        "const gd = document.querySelector('#circuit-graph .js-plotly-plot');"
        "return gd.data.filter(t => t.mode === 'markers').map(t => [t.name, t.customdata.map(c => c[0])]);")
    nodes = {name: ids for name, ids in drawn}
    assert nodes == {"token": ["E_651_1", "E_6037_2"], "feature": ["1_1234_2"], "logit": ["27_576_2"]}
    assert "imported from a file" in driver.find_element("css selector", ".pie-page").text
    assert severe_console_entries(driver) == []
