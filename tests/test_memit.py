"""MEMIT: the update solves its least-squares problem (normal equations) on a tiny model, batched z equals
z computed alone, all three families edit their own stack, bad input changes nothing, and a real batch of
world facts is written into the embedded world decoder."""

from __future__ import annotations

import random

import pytest
import torch

from lethe.adapters import LayerIndexError, get_adapter
from lethe.edits import EditArtifact
from lethe.locate_edit import optimise_values
from lethe.memit import MEMITEditor, hparams_from, keys_and_outputs, memit_update
from lethe.models import LoadedModel
from lethe.records import EditRequest
from lethe.testing import tiny_model, tiny_tokenizer

RNG = random.Random(0)
TEXTS = [" ".join(f"w{RNG.randrange(80)}" for _ in range(16)) for _ in range(96)]


def loaded(model_type: str) -> LoadedModel:
    torch.manual_seed(0)
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    return LoadedModel(model, tiny_tokenizer(model_type), adapter, adapter.family, f"tiny-{model_type}")


def request(i: int = 0) -> EditRequest:
    return EditRequest(prompt="w1 {} w3", subject=f"w{5 + i} w{40 + i}", target_new=f"w{10 + i}",
                       target_true="w11", paraphrase_prompts=[f"w7 w{5 + i} w{40 + i} w3"],
                       neighborhood_prompts=["w8 w9 w3"], case_id=i)


def editor(tmp_path, **hp) -> MEMITEditor:
    params = {"layers": [0, 1], "mom2_corpus": TEXTS, "mom2_n_samples": 96, "context_templates": [[2, 4]],
              "context_source": "corpus", "v_steps": 5, "mom2_update_weight": 3.0}
    params.update(hp)
    return MEMITEditor(params, cache_dir=str(tmp_path / "cov"), progress=False)


def test_update_solves_the_normal_equations():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(7, 12, generator=g, dtype=torch.float64)
    r = torch.randn(7, 5, generator=g, dtype=torch.float64)
    a = torch.randn(40, 12, generator=g, dtype=torch.float64)
    cov = a.T @ a / 40
    lam = 2.5
    dw = memit_update(k, r, cov, lam)
    assert dw.shape == (5, 12) and dw.dtype == torch.float64
    # ΔW (λC + KᵀK) = Rᵀ K: the gradient of ‖K ΔWᵀ - R‖² + λ tr(ΔW C ΔWᵀ) vanishes
    assert torch.allclose(dw @ (lam * cov + k.T @ k), r.T @ k, atol=1e-9)
    # and it is the minimiser: any perturbation costs more
    def cost(w):
        return float(((k @ w.T - r) ** 2).sum() + lam * torch.trace(w @ cov @ w.T))
    assert cost(dw) < cost(dw + 1e-3 * torch.randn(5, 12, generator=g, dtype=torch.float64))


def test_update_with_dead_neurons_still_solves_the_normal_equations():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(4, 6, generator=g, dtype=torch.float64)
    k[:, 2] = 0  # a ReLU neuron that never fires: zero in the keys and in C
    a = torch.randn(30, 6, generator=g, dtype=torch.float64)
    a[:, 2] = 0
    cov = a.T @ a / 30
    r = torch.randn(4, 3, generator=g, dtype=torch.float64)
    dw = memit_update(k, r, cov, 1.0)
    assert torch.allclose(dw @ (cov + k.T @ k), r.T @ k, atol=1e-9)
    assert float(dw[:, 2].abs().max()) < 1e-12


@pytest.mark.parametrize("model_type", ["gpt2", "t5"])
def test_single_layer_edit_is_the_least_squares_update_on_a_tiny_model(tmp_path, model_type):
    lm_ = loaded(model_type)
    # layer 0: the second (last) block still reads the subject position, so z can move the output
    ed = editor(tmp_path, layers=[0])
    reqs = [request(i) for i in range(3)]
    model, ad = lm_.model, lm_.adapter
    prefixes = ed.prefixes(lm_)
    cov = ed.covariance(lm_, 0)
    keys, cur = keys_and_outputs(model, lm_.tokenizer, ad, lm_.family, reqs, 0, 0, None, prefixes)
    z = optimise_values(model, lm_.tokenizer, lm_.family, reqs, ad.block_name(0), ed.hp, prefixes)["z"]
    assert (z - cur).norm() > 0
    name = ad.mlp_out_name(0)
    w0 = ad.weight_out_in(ad.module(model, name)).detach().clone().double()
    art = ed.edit(lm_, reqs)
    assert list(art.deltas) == [f"{name}.weight"]  # T5: the ENCODER's MLP
    if model_type == "t5":
        assert name.startswith("encoder.")
    dw = ad.weight_out_in(ad.module(model, name)).detach().double() - w0
    lam = ed.hp.mom2_update_weight
    resid = (z - cur).double()
    kd = keys.double()
    lhs = dw @ (lam * cov.double() + kd.T @ kd)
    assert torch.allclose(lhs, resid.T @ kd, atol=1e-4 * float((resid.T @ kd).abs().max()))
    # the batch of keys moved toward their targets: residual at the edited layer shrank
    _, after = keys_and_outputs(model, lm_.tokenizer, ad, lm_.family, reqs, 0, 0, None, prefixes)
    assert (z - after).norm() < (z - cur).norm()
    art.revert(model)
    assert torch.equal(ad.weight_out_in(ad.module(model, name)).detach().double(), w0)


def test_batched_z_equals_z_alone(tmp_path):
    lm_ = loaded("gpt2")
    ed = editor(tmp_path, v_steps=4)
    reqs = [request(i) for i in range(3)]
    prefixes = ed.prefixes(lm_)
    args = (lm_.model, lm_.tokenizer, lm_.family)
    together = optimise_values(*args, reqs, lm_.adapter.block_name(0), ed.hp, prefixes)
    assert float(together["delta"].norm()) > 0
    for i, r in enumerate(reqs):
        alone = optimise_values(*args, [r], lm_.adapter.block_name(0), ed.hp, prefixes)
        assert torch.allclose(together["delta"][i], alone["delta"][0], atol=1e-4)
        assert torch.allclose(together["v_init"][i], alone["v_init"][0], atol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert", "t5"])
def test_edits_every_layer_of_the_range_in_each_family(tmp_path, model_type):
    # z at the last block: only the prediction position (or a seq2seq decoder) can still read it
    lm_ = loaded(model_type)
    ed = editor(tmp_path, position="prompt_last")
    art = ed.edit(lm_, [request(0), request(1)])
    names = [lm_.adapter.mlp_out_name(i) + ".weight" for i in (0, 1)]
    assert sorted(art.deltas) == sorted(names)
    assert all(float(d.norm()) > 0 for d in art.deltas.values())
    assert art.meta["layers"] == [0, 1] and art.method == "memit"


def test_bad_input_changes_nothing(tmp_path):
    lm_ = loaded("gpt2")
    snap = {n: p.detach().clone() for n, p in lm_.model.named_parameters()}
    with pytest.raises(LayerIndexError, match="out of range"):
        editor(tmp_path, layers=[1, 2]).edit(lm_, [request()])
    with pytest.raises(LayerIndexError, match="at least one"):
        editor(tmp_path, layers=[]).edit(lm_, [request()])
    with pytest.raises(LayerIndexError, match="twice"):
        editor(tmp_path, layers=[1, -1]).edit(lm_, [request()])
    with pytest.raises(ValueError, match="empty list"):
        editor(tmp_path).edit(lm_, [])
    bad = EditRequest(prompt="w1 w3", subject="w5", target_new="w10", target_true="w11", case_id="x7")
    with pytest.raises(ValueError, match="x7"):
        editor(tmp_path).edit(lm_, [request(), bad])
    with pytest.raises(ValueError, match="unknown MEMIT hyperparameters"):
        hparams_from("gpt-j", lr=1)
    with pytest.raises(ValueError, match="position"):
        editor(tmp_path, position="middle").edit(lm_, [request()])
    for n, p in lm_.model.named_parameters():
        assert torch.equal(p, snap[n]), n


def test_published_presets():
    # the papers' values live in configs/edit/memit_gpt2-xl.yaml / memit_gpt-j.yaml; the former names still work
    assert hparams_from("edit/memit_gpt2-xl.yaml").layers == [13, 14, 15, 16, 17]
    with pytest.warns(DeprecationWarning, match="memit_gpt-j.yaml"):
        assert hparams_from("gpt-j").layers == [3, 4, 5, 6, 7, 8]
    assert hparams_from("edit/memit_gpt2-xl").mom2_update_weight == 20000
    assert hparams_from("edit/memit_gpt-j").mom2_update_weight == 15000
    assert hparams_from("edit/memit_gpt-j").clamp_norm_factor == 0.75


def test_registered_in_the_edit_cli():
    from lightning_modules.editing import build_editor

    assert isinstance(build_editor("memit", {"hparams": "edit/memit_decoder"}), MEMITEditor)


@pytest.fixture(scope="module")
def world_decoder():
    pytest.importorskip("lethe.world_models")
    from lethe.models import load_model

    return load_model("lethe:world-decoder")


def test_memit_writes_a_batch_of_world_facts(world_decoder, tmp_path):
    from lethe.evaluation import counterfact_scores
    from lethe.world_models import load_world

    m, tok = world_decoder.model, world_decoder.tokenizer
    pool = load_world().to_counterfact("train")[:60]
    known = counterfact_scores(m, tok, "decoder", pool)["efficacy_per_case"]
    reqs = [r for r, e in zip(pool, known) if e == 0.0][:16]
    ed = MEMITEditor("world-decoder", cache_dir=str(tmp_path), progress=False,
                     overrides={"mom2_n_samples": 1000})
    art = ed.edit(world_decoder, reqs)
    post = counterfact_scores(m, tok, "decoder", reqs)
    art.revert(m)
    assert post["efficacy"] >= 0.75, post["efficacy"]  # new facts written, in one call
    assert post["neighborhood"] >= 0.75, post["neighborhood"]  # other subjects keep their objects
    assert counterfact_scores(m, tok, "decoder", reqs)["efficacy"] == 0.0  # reverted exactly
    assert isinstance(art, EditArtifact) and len(art.requests) == len(reqs)


def test_the_update_step_is_the_one_place_a_successor_overrides(tmp_path):
    """An AlphaEdit-style subclass: only update_step changes (ΔW projected onto the null space of preserved
    keys K0), and every layer's written delta then leaves those keys' outputs exactly unchanged."""
    lm_ = loaded("gpt2")
    width = lm_.adapter.weight_out_in(lm_.adapter.module(lm_.model, lm_.adapter.mlp_out_name(0))).shape[1]
    k0 = torch.randn(width, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    projector = torch.eye(width, dtype=torch.float64) - k0 @ torch.linalg.pinv(k0)  # P k0 = 0

    class NullSpaceMEMIT(MEMITEditor):
        calls = 0

        def update_step(self, loaded_, layer, keys, resid):
            NullSpaceMEMIT.calls += 1
            return super().update_step(loaded_, layer, keys, resid) @ projector

    params = {"layers": [0, 1], "mom2_corpus": TEXTS, "mom2_n_samples": 96, "context_templates": [],
              "v_steps": 5, "mom2_update_weight": 3.0, "position": "prompt_last"}
    ad = lm_.adapter
    mods = [ad.module(lm_.model, ad.mlp_out_name(i)) for i in (0, 1)]
    before = [ad.weight_out_in(m).detach().double().clone() for m in mods]
    NullSpaceMEMIT(params, cache_dir=str(tmp_path / "cov"), progress=False).edit(lm_, [request(0), request(1)])
    assert NullSpaceMEMIT.calls == 2
    for m, w0 in zip(mods, before):
        d = ad.weight_out_in(m).detach().double() - w0  # (out, in) whatever the storage layout
        assert float(d.norm()) > 0 and float((d @ k0).abs().max()) < 1e-5 * float(d.abs().max())
