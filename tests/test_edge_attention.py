"""Attention patterns stored with edge circuits: which heads, equal to the model's own eager
attention probabilities, served by /api/edge-circuits/{id}/attention (404s, bounded head ids)."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from backend.api.app import create_app
from backend.edges.attention import circuit_heads, head_attention
from backend.edges.graph import EdgeGraph
from backend.models.adapters import ModelAdapter
from backend.tasks import get_task
from tests.api_fixtures import TINY_MODEL, api_settings, tiny_cache  # noqa: F401 (fixtures)
from tests.test_api import wait_for
from tests.tiny_models import ARCHS, tiny_model
from tests.tokenizers import tiny_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def eager_attentions(model, batch) -> tuple[torch.Tensor, ...]:
    """transformers' own eager attention probabilities, [B, H, T, T] per layer."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(input_ids=batch.clean_ids, attention_mask=batch.attention_mask, output_attentions=True)
    return out.attentions


def test_circuit_heads_cover_writers_queries_and_every_head_sharing_a_kv_head():
    g = EdgeGraph.build(n_layers=3, n_heads=4, n_kv_heads=2)
    heads = circuit_heads(g, ["embed->a0.q3", "a0.h1->m0", "m0->a2.k1", "a1.h2->logits", "embed->m1"])
    assert heads == [(0, 1), (0, 3), (1, 2), (2, 2), (2, 3)]
    assert circuit_heads(g, ["embed->m0", "m0->logits"]) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_patterns_equal_the_models_eager_attention(arch):
    tok = tiny_tokenizer()
    adapter = ModelAdapter(tiny_model(arch, vocab_size=len(tok), seed=3), tok, name=f"tiny-{arch}")
    batch = get_task("ioi").build(tok, 5, seed=1)
    heads = [(0, 0), (1, 3), (2, 1)]
    got = head_attention(adapter, batch, heads, n_prompts=3, max_tokens=6)
    reference = eager_attentions(tiny_model(arch, vocab_size=len(tok), seed=3), batch.subset(slice(0, 3)))
    assert got.prompt_indices == [0, 1, 2]
    for b in range(3):
        length = int(batch.last_pos[b]) + 1
        start = max(0, length - 6)
        assert got.offsets[b] == start and len(got.tokens[b]) == length - start
        assert got.tokens[b] == [tok.decode([i]) for i in batch.clean_ids[b, start:length].tolist()]
        for layer, h in heads:
            want = reference[layer][b, h, start:length, start:length]
            torch.testing.assert_close(got.patterns[(layer, h)][b], want, atol=1e-6, rtol=1e-5)
    data = got.to_json()
    (head,) = [x for x in data["heads"] if x["head"] == "a1.h3"]
    last = reference[1][0, 3, int(batch.last_pos[0])]
    assert head["top"][0]["key"] == int(torch.argmax(last))
    assert head["top"][0]["weight"] == pytest.approx(float(last.max()), abs=1e-6)
    assert head["top"][0]["query"] == int(batch.last_pos[0])


def test_what_is_stored_stays_bounded():
    tok = tiny_tokenizer()
    adapter = ModelAdapter(tiny_model("llama", vocab_size=len(tok)), tok)
    batch = get_task("ioi").build(tok, 6, seed=0)
    heads = [(0, h) for h in range(4)]
    sizes = [min(int(t) + 1, 5) ** 2 * 4 for t in batch.last_pos[:6]]
    got = head_attention(adapter, batch, heads, n_prompts=6, max_tokens=5, max_values=sum(sizes[:3]))
    assert len(got.prompt_indices) == 3 and all(p.shape == (5, 5) for p in got.patterns[(0, 0)])
    assert len(head_attention(adapter, batch, heads, max_values=1).prompt_indices) == 1     # at least one
    assert head_attention(adapter, batch, []).patterns == {}


def test_attention_route_serves_the_models_attention_and_404s(api_settings):
    body = {"kind": "edges", "params": {"model": TINY_MODEL, "task": "ioi", "n": 10, "method": "eap", "edges": 30}}
    with TestClient(create_app(api_settings)) as c:
        job = wait_for(c, c.post("/api/jobs", json=body).json()["id"], {"done", "failed"}, timeout=120)
        assert job["status"] == "done", job
        cid = job["edge_circuit_id"]
        kept = [e["id"] for e in c.get(f"/api/edge-circuits/{cid}").json()["result"]["kept"]]
        data = c.get(f"/api/edge-circuits/{cid}/attention").json()
        assert data["n_prompts"] == 8 and len(data["prompts"]) == 8        # bounded: the first 8 of 10

        path = api_settings.models_cache / TINY_MODEL / "model"
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        cfg = model.config
        expected_heads = circuit_heads(EdgeGraph.build(cfg.num_hidden_layers, cfg.num_attention_heads,
                                                       cfg.num_key_value_heads), kept)
        assert [(h["layer"], h["index"]) for h in data["heads"]] == expected_heads and expected_heads
        batch = get_task("ioi").build(tok, 10, seed=0)
        reference = eager_attentions(model, batch.subset(slice(0, 8)))
        for h in data["heads"]:
            for b, (prompt, pattern) in enumerate(zip(data["prompts"], h["patterns"])):
                length = int(batch.last_pos[b]) + 1
                assert prompt["tokens"] == [tok.decode([i]) for i in batch.clean_ids[b, :length].tolist()]
                want = reference[h["layer"]][b, h["index"], :length, :length]
                torch.testing.assert_close(torch.tensor(pattern), want, atol=0.6 * 10 ** -data["decimals"], rtol=0)

        one = c.get(f"/api/edge-circuits/{cid}/attention", params={"head": data["heads"][0]["head"],
                                                                    "patterns": "false"}).json()
        assert [h["head"] for h in one["heads"]] == [data["heads"][0]["head"]] and one["heads"][0]["patterns"] is None
        assert one["heads"][0]["top"] == data["heads"][0]["top"]
        missing = c.get(f"/api/edge-circuits/{cid}/attention", params={"head": "a99.h0"})
        assert missing.status_code == 404 and "not in edge circuit" in missing.json()["detail"]
        assert c.get("/api/edge-circuits/999/attention").status_code == 404
        assert c.get("/api/edge-circuits/0/attention").status_code == 422
        assert c.get(f"/api/edge-circuits/{cid}/attention", params={"head": "<img src=x>"}).status_code == 422
