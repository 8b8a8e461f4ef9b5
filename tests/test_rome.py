"""ROME: the algebra of the rank-one update, key/value extraction in all three families, bad input, and one
real edit of the embedded world decoder."""

from __future__ import annotations

import random

import pytest
import torch

from lethe.adapters import LayerIndexError, get_adapter
from lethe.covariance import CovarianceCacheError, layer_covariance
from lethe.edits import EditArtifact
from lethe.lm import EncodingError
from lethe.models import LoadedModel
from lethe.records import EditRequest
from lethe.rome import (
    ROMEEditor,
    SubjectNotFoundError,
    compute_keys,
    hparams_from,
    rome_update,
)
from lethe.testing import tiny_model, tiny_tokenizer

RNG = random.Random(0)
TEXTS = [" ".join(f"w{RNG.randrange(80)}" for _ in range(16)) for _ in range(96)]


def loaded(model_type: str) -> LoadedModel:
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    return LoadedModel(model, tiny_tokenizer(model_type), adapter, adapter.family, f"tiny-{model_type}")


def request(i: int = 0, **kw) -> EditRequest:
    base = {"prompt": "w1 {} w3", "subject": f"w{5 + i} w6", "target_new": "w10", "target_true": "w11",
                "paraphrase_prompts": [f"w7 w{5 + i} w6 w3"], "neighborhood_prompts": ["w8 w9 w3"], "case_id": i}
    base.update(kw)
    return EditRequest(**base)


def editor(tmp_path, **hp) -> ROMEEditor:
    params = {"layer": 0, "mom2_corpus": TEXTS, "mom2_n_samples": 96, "context_templates": [[2, 4]],
                  "context_source": "corpus", "v_steps": 5}
    params.update(hp)
    return ROMEEditor(params, cache_dir=str(tmp_path / "cov"), progress=False)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert", "t5"])
def test_update_writes_value_and_is_rank_one(tmp_path, model_type):
    lm_ = loaded(model_type)
    ed = editor(tmp_path)
    ad = lm_.adapter
    name = ad.mlp_out_name(0)
    module = ad.module(lm_.model, name)
    art = ed.edit(lm_, [request()])
    vec = ed.last_vectors[0]
    # the edited parameter is the one projection, for T5 in the ENCODER
    assert list(art.deltas) == [f"{name}.weight"]
    if model_type == "t5":
        assert name.startswith("encoder.")
    delta = art.deltas[f"{name}.weight"].double()
    s = torch.linalg.svdvals(delta)
    assert s[0] > 0 and s[1] / s[0] < 1e-5, "the update is not rank one"
    # W' k* = v* = v0 + δ (k* is unchanged: it is the input of the edited projection)
    k_again = compute_keys(lm_.model, lm_.tokenizer, ad, lm_.family, [request()], 0, None, ed.prefixes(lm_))[0]
    torch.testing.assert_close(k_again, vec["k_star"])
    with torch.no_grad():
        out = module(vec["k_star"].unsqueeze(0))[0]
    torch.testing.assert_close(out, vec["v_init"] + vec["delta"], atol=1e-5, rtol=1e-4)
    assert vec["delta"].norm() > 0


def test_c_inverse_orthogonal_key_keeps_its_value(tmp_path):
    lm_ = loaded("gpt2")
    ad = lm_.adapter
    cov = layer_covariance(lm_.model, lm_.tokenizer, ad, "decoder", 0, corpus=TEXTS, n_samples=96,
                           cache_dir=tmp_path, progress=False)
    g = torch.Generator().manual_seed(1)
    k_star = torch.randn(cov.shape[0], generator=g, dtype=torch.float64)
    delta = torch.randn(32, generator=g, dtype=torch.float64)
    dw = rome_update(k_star, delta, cov)
    u = torch.linalg.solve(cov, k_star)
    r = torch.randn(cov.shape[0], generator=g, dtype=torch.float64)
    k_orth = r - (u @ r) / (u @ k_star) * k_star  # uᵀ k_orth = 0
    torch.testing.assert_close(dw @ k_star, delta, atol=1e-9, rtol=1e-9)
    assert (dw @ k_orth).abs().max() < 1e-9 * max(1.0, float(dw.abs().max()))
    # a key NOT C⁻¹-orthogonal does move
    assert (dw @ r).abs().max() > 1e-6


def test_update_with_a_dead_neuron_still_writes_the_value():
    # a ReLU neuron that never fires (T5's world model has some) is zero in C and in k*: C is singular
    g = torch.Generator().manual_seed(2)
    a = torch.randn(40, 8, generator=g, dtype=torch.float64)
    a[:, 3] = 0
    cov = a.T @ a / 40
    k_star = a[0].clone()
    delta = torch.randn(5, generator=g, dtype=torch.float64)
    dw = rome_update(k_star, delta, cov)
    torch.testing.assert_close(dw @ k_star, delta, atol=1e-9, rtol=1e-9)
    assert torch.linalg.matrix_rank(dw) == 1
    assert float(dw[:, 3].abs().max()) < 1e-12


def test_revert_is_bit_exact_and_artifact_reapplies(tmp_path):
    lm_ = loaded("gpt2")
    before = {n: p.detach().clone() for n, p in lm_.model.named_parameters()}
    art = editor(tmp_path).edit(lm_, [request(0), request(1)])
    edited = {n: p.detach().clone() for n, p in lm_.model.named_parameters()}
    assert any(not torch.equal(before[n], edited[n]) for n in before)
    art.revert(lm_.model)
    assert all(torch.equal(before[n], p) for n, p in lm_.model.named_parameters())
    # saved, loaded and applied to a fresh copy: the same edited weights; reverted: the same original ones
    art.save(tmp_path / "art")
    fresh = tiny_model("gpt2")
    again = EditArtifact.load(tmp_path / "art")
    again.apply(fresh)
    for n, p in fresh.named_parameters():
        torch.testing.assert_close(p, edited[n], atol=1e-6, rtol=0)
    assert [r.subject for r in again.requests] == ["w5 w6", "w6 w6"]
    again.revert(fresh)
    assert all(torch.equal(before[n], p) for n, p in fresh.named_parameters())


def test_bad_input(tmp_path):
    lm_ = loaded("gpt2")
    ed = editor(tmp_path)
    before = {n: p.detach().clone() for n, p in lm_.model.named_parameters()}
    with pytest.raises(SubjectNotFoundError, match="subject"):
        ed.edit(lm_, [request(), request(1, subject="   ")])
    bad = request()
    bad.prompt = "w1 w3"  # no placeholder: the subject is nowhere in the prompt
    with pytest.raises(SubjectNotFoundError, match="case 0"):
        ed.edit(lm_, [bad])
    with pytest.raises(EncodingError, match="tokenises to nothing"):
        ed.edit(lm_, [request(target_new=" ")])
    with pytest.raises(LayerIndexError, match="out of range"):
        editor(tmp_path, layer=7).edit(lm_, [request()])
    # nothing was half-applied
    assert all(torch.equal(before[n], p) for n, p in lm_.model.named_parameters())
    with pytest.raises(ValueError, match="unknown ROME hyperparameters"):
        hparams_from("edit/rome_decoder", lr=3)


def test_covariance_cache_reuse_invalidation_and_other_model(tmp_path, monkeypatch):
    import lethe.covariance as cv

    calls = []
    real = cv.second_moment

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(cv, "second_moment", counting)
    lm_ = loaded("gpt2")
    args = {"corpus": TEXTS, "n_samples": 64, "cache_dir": tmp_path, "progress": False, "source": "tiny"}
    c1 = layer_covariance(lm_.model, lm_.tokenizer, lm_.adapter, "decoder", 0, **args)
    c2 = layer_covariance(lm_.model, lm_.tokenizer, lm_.adapter, "decoder", 0, **args)
    assert len(calls) == 1 and torch.equal(c1, c2)
    layer_covariance(lm_.model, lm_.tokenizer, lm_.adapter, "decoder", 0, **{**args, "n_samples": 32})
    assert len(calls) == 2
    layer_covariance(lm_.model, lm_.tokenizer, lm_.adapter, "decoder", 0, **{**args, "corpus": TEXTS[::-1]})
    assert len(calls) == 3
    assert torch.allclose(c1, c1.T) and torch.linalg.eigvalsh(c1).min() > -1e-9
    other = tiny_model("gpt2", seed=1)  # same architecture and name, other weights
    with pytest.raises(CovarianceCacheError, match="another model"):
        layer_covariance(other, lm_.tokenizer, lm_.adapter, "decoder", 0, **args)


@pytest.fixture(scope="module")
def world_decoder():
    pytest.importorskip("lethe.world_models")
    from lethe.models import load_model

    return load_model("lethe:world-decoder")


def test_rome_edits_a_world_fact(world_decoder, tmp_path):
    """The edited model says the new object, its paraphrases move with it, its neighbours keep theirs."""
    from lethe.evaluation import counterfact_scores
    from lethe.lm import greedy_match
    from lethe.world_models import load_world

    m, tok = world_decoder.model, world_decoder.tokenizer
    pool = load_world().to_counterfact("train")[:20]
    known = greedy_match(m, tok, "decoder", [r.rewrite_prompt for r in pool], [r.target_true for r in pool])
    reqs = [r for r, k in zip(pool, known.tolist()) if k][:5]  # facts the model says before the edit
    assert len(reqs) == 5
    ed = ROMEEditor("edit/rome_decoder", cache_dir=str(tmp_path), progress=False,
                    overrides={"mom2_n_samples": 1000})
    pre = counterfact_scores(m, tok, "decoder", reqs)
    assert pre["efficacy"] == 0.0 and pre["neighborhood"] == 1.0
    says_new, paraphrase = [], []
    for r in reqs:
        art = ed.edit(world_decoder, [r])
        post = counterfact_scores(m, tok, "decoder", [r])
        says_new.append(bool(greedy_match(m, tok, "decoder", [r.rewrite_prompt], [r.target_new]).all()))
        paraphrase.append(post["paraphrase"])
        assert post["efficacy"] == 1.0 and post["neighborhood"] >= 0.8, (r, post)
        art.revert(m)
    assert sum(says_new) >= 4, says_new
    assert sum(paraphrase) / len(paraphrase) >= 0.6, paraphrase
    assert counterfact_scores(m, tok, "decoder", reqs)["efficacy"] == 0.0  # all reverted
