"""Knowledge Neurons: integrated-gradients algebra on tiny models, operations, artifacts, one world check."""

from __future__ import annotations

import json

import pytest
import torch

from lethe import attribution as A
from lethe import lm
from lethe.adapters import LayerIndexError, get_adapter
from lethe.testing import tiny_model, tiny_tokenizer


def _example(model, seed: int = 0) -> dict[str, torch.Tensor]:
    fam = get_adapter(model).family
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 90, (1, 6), generator=g)
    lab = torch.full_like(ids, lm.IGNORE)
    if fam == "decoder":
        lab[0, 5] = ids[0, 5]
    elif fam == "mlm":
        ids[0, 3] = 4
        lab[0, 3] = 17
    else:
        lab = torch.tensor([[17, 23]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": lab}


def _prob(model, ex, fam):
    with torch.no_grad():
        return float(A.target_probability_from_logits(lm.forward_logits(model, ex, fam), ex["labels"], fam))


@pytest.mark.parametrize("model_type,stack", [("gpt2", "decoder"), ("llama", "decoder"), ("bert", "encoder"),
                                              ("t5", "encoder"), ("t5", "decoder")])
def test_completeness_within_riemann_error(model_type, stack):
    """Sum of a layer's attributions = P(real) - P(zeroed layer), error shrinking ~1/m."""
    model = tiny_model(model_type).double()
    ad, ex = get_adapter(model), _example(model)
    fam = ad.family
    width = ad.ffn_width(model, 1, stack)
    with A.suppress(model, [A.Neuron(stack, 1, i) for i in range(width)], ex, fam):
        p_zero = _prob(model, ex, fam)
    errors = []
    for m in (4, 16, 64):
        res = A.integrated_gradients(model, ex, fam, [(stack, 1)], steps=m)
        assert res.prob == pytest.approx(_prob(model, ex, fam), rel=1e-9)
        errors.append(abs(float(res.scores[(stack, 1)].sum()) - (res.prob - p_zero)))
    delta = abs(res.prob - p_zero)
    assert delta > 0
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.05 * delta


@pytest.mark.parametrize("model_type,target_tokens", [
    ("gpt2", 1), ("gpt2", 3), ("llama", 1), ("llama", 2), ("opt", 1), ("gpt_neox", 2), ("gptj", 1),
    ("mistral", 2), ("qwen2", 1), ("bert", 1), ("t5", 1), ("bart", 1)])
def test_batched_equals_step_by_step(model_type, target_tokens, monkeypatch):
    """One batch of m steps (several layers packed, shared prefix, sliced head; on decoders the positions before
    the scaled one computed once, from the KV cache) == m sequential passes, for one- and multi-token targets."""
    model = tiny_model(model_type).double()
    ex, fam = _example(model, seed=1), get_adapter(model).family
    if target_tokens > 1:  # teacher-forced later target tokens see the scaled position through attention
        ex["labels"][0, 6 - target_tokens:] = ex["input_ids"][0, 6 - target_tokens:]
    made = []

    class Spy(lm.PrefixCache):
        def __init__(self, *a):
            made.append(1)
            super().__init__(*a)

    monkeypatch.setattr(lm, "PrefixCache", Spy)
    sites = A.resolve_sites(model)
    seq = A.integrated_gradients(model, ex, fam, sites, steps=6, max_rows=1, fast=False)
    for max_rows in (6, 9, None):
        bat = A.integrated_gradients(model, ex, fam, sites, steps=6, max_rows=max_rows)
        for site in sites:
            torch.testing.assert_close(bat.scores[site], seq.scores[site], rtol=1e-9, atol=1e-13)
        assert bat.prob == pytest.approx(seq.prob, rel=1e-12)
    assert bool(made) == (fam == "decoder")  # the cached path ran on every decoder


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert", "t5"])
def test_suppress_enhance_act_inside_and_leave_model_identical(model_type):
    model = tiny_model(model_type)
    ad, ex = get_adapter(model), _example(model)
    fam = ad.family
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = lm.forward_logits(model, ex, fam)
    stack = ad.default_stack if fam != "seq2seq" else "decoder"
    neurons = [A.Neuron(stack, 0, i) for i in range(0, 64, 3)]
    for ctx in (A.suppress, A.enhance):
        with torch.no_grad(), ctx(model, neurons, ex, fam):
            inside = lm.forward_logits(model, ex, fam)
        assert not torch.equal(inside, ref)
        with torch.no_grad():
            after = lm.forward_logits(model, ex, fam)
        assert torch.equal(after, ref)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_erase_and_revert_restore_weights(model_type, tmp_path):
    from lethe.edits import EditArtifact
    from lethe.knowledge_neurons import erase_artifact
    from lethe.models import LoadedModel

    model = tiny_model(model_type)
    ad = get_adapter(model)
    loaded = LoadedModel(model, None, ad, ad.family, f"tiny-{model_type}")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    neurons = [A.Neuron("decoder", 1, 5), A.Neuron("decoder", 1, 9), A.Neuron("decoder", 0, 2)]
    art = erase_artifact(loaded, neurons)
    w1 = ad.weight_out_in(ad.module(model, ad.mlp_out_name(1)))
    assert torch.all(w1[:, [5, 9]] == 0) and torch.any(w1[:, 6] != 0)
    art.save(tmp_path / "erase")
    art.revert(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    again = EditArtifact.load(tmp_path / "erase")
    again.apply(model)
    assert torch.all(ad.weight_out_in(ad.module(model, ad.mlp_out_name(0)))[:, 2] == 0)
    again.revert(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_edit_deltas_shift_value_vectors_by_word_embeddings():
    model, tok = tiny_model("gpt2"), tiny_tokenizer("gpt2")
    ad = get_adapter(model)
    neurons = [A.Neuron("decoder", 1, 3), A.Neuron("decoder", 1, 40)]
    deltas = A.edit_deltas(model, tok, neurons, "w5", "w7", lambda_old=1.0, lambda_new=8.0)
    name = ad.mlp_out_name(1) + ".weight"
    assert list(deltas) == [name]
    d = deltas[name].T  # GPT-2's Conv1D stores (in, out)
    emb = model.transformer.wte.weight
    old = emb[tok(lm.target_text("w5"), add_special_tokens=False)["input_ids"][0]]
    new = emb[tok(lm.target_text("w7"), add_special_tokens=False)["input_ids"][0]]
    torch.testing.assert_close(d[:, 3], 8.0 * new - old)
    torch.testing.assert_close(d[:, 40], 8.0 * new - old)
    assert torch.all(d[:, [0, 1, 2, 4]] == 0)


def test_refinement_threshold_and_share():
    scores = {"decoder": torch.tensor([[1.0, 0.1, 0.3], [0.0, -2.0, 0.25]])}
    layers = {"decoder": [2, 5]}
    coarse = A.coarse_neurons(scores, layers, threshold=0.2)
    assert coarse == [A.Neuron("decoder", 2, 0), A.Neuron("decoder", 2, 2), A.Neuron("decoder", 5, 2)]
    sets = [coarse, [A.Neuron("decoder", 2, 0)], [A.Neuron("decoder", 2, 0), A.Neuron("decoder", 5, 2)]]
    assert A.refine(sets, share=0.5) == [A.Neuron("decoder", 2, 0), A.Neuron("decoder", 5, 2)]
    assert A.refine(sets, share=1.0) == [A.Neuron("decoder", 2, 0)]
    assert A.coarse_neurons({"decoder": -torch.ones(2, 3)}, layers) == []
    chosen = [A.Neuron("decoder", 0, 1), A.Neuron("decoder", 0, 7), A.Neuron("decoder", 1, 3)]
    rnd = A.random_like(tiny_model("gpt2"), chosen, seed=0)
    assert sorted(n.layer for n in rnd) == [0, 0, 1] and not set(rnd) & set(chosen)


def test_bad_input():
    bert, btok = tiny_model("bert"), tiny_tokenizer("bert")
    with pytest.raises(A.MultiTokenTargetError, match="single-token"):
        A.attribute(bert, btok, "mlm", ["w1 w2"], "w3 w4", steps=2)
    with pytest.raises(A.AttributionError, match="empty prompt list"):
        A.attribute(bert, btok, "mlm", [], "w3", steps=2)
    with pytest.raises(LayerIndexError, match="out of range"):
        A.attribute(bert, btok, "mlm", ["w1 w2"], "w3", layers=[2], steps=2)
    gpt2 = tiny_model("gpt2")
    with pytest.raises(A.AttributionError, match="out of range"):
        A.erase_deltas(gpt2, [A.Neuron("decoder", 0, 64)])
    with pytest.raises(LayerIndexError):
        A.erase_deltas(gpt2, [A.Neuron("decoder", 7, 0)])


@pytest.fixture(scope="module")
def world_decoder():
    pytest.importorskip("lethe.world_models")
    from lethe.models import load_model

    return load_model("lethe:world-decoder")


def test_world_suppression_beats_random_and_edit_artifact(world_decoder, tmp_path):
    """On the trained world model: refined neurons matter more than random ones; an edit moves the fact."""
    from lethe import evaluation as ev
    from lethe.knowledge_neurons import KnowledgeNeuronsEditor
    from lethe.world_models import load_world

    loaded = world_decoder
    model, tok, fam = loaded.model, loaded.tokenizer, loaded.family
    reqs = load_world().to_counterfact("train")[:6]
    editor = KnowledgeNeuronsEditor(steps=10, max_prompts=3)
    drops, rdrops = [], []
    for i, req in enumerate(reqs[:4]):
        neurons, fa = editor.neurons(loaded, req)
        assert neurons and all(n.stack == "decoder" for n in neurons)
        tgt = [req.target_true] * len(fa.prompts)
        p0 = A.fact_probabilities(model, tok, fam, fa.prompts, tgt)
        ps = A.fact_probabilities(model, tok, fam, fa.prompts, tgt, neurons, 0.0)
        pr = A.fact_probabilities(model, tok, fam, fa.prompts, tgt, A.random_like(model, neurons, seed=i), 0.0)
        drops.append(float(((p0 - ps) / p0).mean()))
        rdrops.append(float(((p0 - pr) / p0).mean()))
    assert sum(drops) / 4 > 0.1 and sum(drops) / 4 > sum(rdrops) / 4 + 0.05
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = ev.counterfact_scores(model, tok, fam, reqs[:2])
    art = editor.edit(loaded, reqs[:2])
    after = ev.counterfact_scores(model, tok, fam, reqs[:2])
    assert after["p_new"] > before["p_new"]
    art.save(tmp_path / "kn")
    meta = json.loads((tmp_path / "kn" / "artifact.json").read_text())
    assert meta["method"] == "kn" and len(meta["meta"]["neurons"]) == 2
    art.revert(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_attribute_cli_writes_scores_neurons_heatmap(world_decoder, tmp_path):
    from lethe.attribute_cli import main

    res = main(["--config", "configs/neurons/decoder.yaml", "--data.limit", "1", "--attribution.steps", "5",
                "--run.root", str(tmp_path), "--run.logger", "csv"])
    facts = list((tmp_path / "neurons_decoder" / "facts").iterdir())
    assert len(facts) == 1 and res["facts"] == 1
    names = {p.name for p in facts[0].iterdir()}
    assert names == {"scores.safetensors", "neurons.json", "heatmap.png"}
    data = json.loads((facts[0] / "neurons.json").read_text())
    assert data["refined"] and len(data["coarse"]) == len(data["prompts"]) >= 2
    assert (facts[0] / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(LayerIndexError):
        main(["--config", "configs/neurons/decoder.yaml", "--attribution.layers", "[9]",
              "--run.root", str(tmp_path / "bad")])
    assert not (tmp_path / "bad" / "neurons_decoder" / "facts").exists()
