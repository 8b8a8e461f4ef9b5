"""KnowledgeEditor: its update is the gradient-conditioned formula on autograd's ∇W, the base model never
changes, checkpoints reload to identical edits and refuse other editors/models, 2-process training equals
1-process training, and over-long edits are refused."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from test_mend import REQS, fit, heldout_locality, request

from lethe import lm
from lethe.hypernetworks import (
    EditInputError,
    EditorCheckpointError,
    gradient_factors,
    grads_from_loss_check,
)
from lethe.knowledge_editor import KEEditor
from lethe.mend import MENDEditor
from lethe.models import load_model
from lethe.testing import save_tiny
from lightning_modules.knowledge_editor import KnowledgeEditorModule


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    return str(save_tiny("gpt2", tmp_path_factory.mktemp("tiny") / "gpt2"))


@pytest.mark.parametrize("model_type", ["gpt2", "t5"])
def test_update_is_the_conditioned_gradient_formula(tmp_path, model_type):
    path = str(save_tiny(model_type, tmp_path / model_type))
    module = KnowledgeEditorModule(path, layers=[-1], smoothing=0.0)
    net = module.net.eval()
    reqs = REQS[:2]
    batch = lm.encode_pairs(module.tokenizer, module.family, [r.rewrite_prompt for r in reqs],
                            [r.target_new for r in reqs])
    fac = gradient_factors(module.model, module.family, module.sites, batch)
    with torch.no_grad():
        got = net.deltas(module.model, module.tokenizer, module.family, reqs, [[0], [1]])
        c = net.condition(module.model, module.tokenizer, reqs)
    for site in module.sites:
        one = lm.encode_pairs(module.tokenizer, module.family, [reqs[0].rewrite_prompt], [reqs[0].target_new])
        grad = grads_from_loss_check(module.model, module.family, site, one)  # autograd on the parameter
        x, d = fac.select(site, [0])
        torch.testing.assert_close(d.T @ x, grad, rtol=1e-4, atol=1e-6)
        m, n = site.shape
        with torch.no_grad():
            col_a, row_a, col_b, row_b, eta = net.conditioners[site.module.replace(".", "__")](c[0]).split(
                [n, m, n, m, 1])
            a = torch.outer(row_a.softmax(-1), col_a)
            b = torch.outer(row_b.softmax(-1), col_b)
            want = -net.max_scale * torch.sigmoid(eta) * (grad * a + b)
        torch.testing.assert_close(got[0][site.param], want, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(got[0][site.param], got[1][site.param])  # each edit its own text and gradient


def _applied_as_trained(module, trainer, ckpt, model_path: str, reqs):
    """Save ``trainer``'s checkpoint to ``ckpt``, apply it with ``KEEditor`` to a freshly loaded model and check
    its deltas are the trained network's; returns (that model, the artifact)."""
    trainer.save_checkpoint(ckpt)
    module.net.eval()
    with torch.no_grad():
        want = module.net.deltas(module.model, module.tokenizer, module.family, reqs)[0]
    fresh = load_model(model_path)
    art = KEEditor(str(ckpt)).edit(fresh, reqs)
    for name, d in want.items():
        torch.testing.assert_close(art.deltas[name], d.T.contiguous(), rtol=0, atol=1e-7)
    return fresh, art


def test_training_keeps_base_and_checkpoint_reloads(tiny_gpt2, tmp_path):
    L.seed_everything(0)
    module = KnowledgeEditorModule(tiny_gpt2, layers=[-1], lr=1e-2)
    base = {k: v.clone() for k, v in module.model.state_dict().items()}
    net0 = {k: v.clone() for k, v in module.net.state_dict().items()}
    trainer = fit(module, steps=3)
    assert all(torch.equal(base[k], v) for k, v in module.model.state_dict().items())
    assert any(not torch.equal(net0[k], v) for k, v in module.net.state_dict().items())
    assert float(module.lagrange) >= 0.0
    ckpt = tmp_path / "ke.ckpt"
    fresh, art = _applied_as_trained(module, trainer, ckpt, tiny_gpt2, REQS[:3])
    art.revert(fresh.model)
    assert all(torch.equal(base[k], v) for k, v in fresh.model.state_dict().items())
    KnowledgeEditorModule.load_from_checkpoint(ckpt)
    with pytest.raises(EditorCheckpointError, match="other layers"):
        KnowledgeEditorModule.load_from_checkpoint(ckpt, layers=[0])
    with pytest.raises(EditorCheckpointError, match="not a 'mend'"):
        MENDEditor(str(ckpt)).edit(fresh, REQS[:1])
    with pytest.raises(EditInputError, match="case 5"):
        KEEditor(str(ckpt)).edit(fresh, [request(5, target_new=" ".join(["w20"] * 70))])


def _state(path: str, devices: int, batch_size: int) -> dict:
    L.seed_everything(0)
    module = KnowledgeEditorModule(path, layers=[-1], lr=1e-3)
    fit(module, steps=2, batch_size=batch_size, devices=devices, **({"strategy": "ddp_spawn"} if devices > 1 else {}))
    return {k: v.detach().clone() for k, v in module.state_dict().items() if not k.startswith("model.")}


def test_two_process_training_equals_one_process(tiny_gpt2):
    one, two = _state(tiny_gpt2, 1, 4), _state(tiny_gpt2, 2, 2)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)


def test_the_kl_constraint_raises_heldout_neighbourhood():
    """KE's Lagrangian in isolation: with a margin no KL reaches (100) the multiplier falls to 0 and the editor
    ignores locality; with a tight margin (0.001) λ rises and held-out facts' neighbourhood (scored by
    lethe.evaluation) is higher."""
    scores, lagrange = {}, {}
    for margin in (100.0, 1e-3):
        L.seed_everything(0)
        module = KnowledgeEditorModule("lethe:world-decoder", lr=5e-3, lr_lagrange=0.2, margin_max=margin,
                                       margin_min=margin)
        scores[margin] = heldout_locality(module, steps=60)
        lagrange[margin] = float(module.lagrange)
    loose, tight = scores[100.0], scores[1e-3]
    assert lagrange[100.0] == 0.0 and lagrange[1e-3] > 1.0, lagrange
    assert tight["neighborhood"] > loose["neighborhood"], scores
    assert tight["efficacy"] >= 0.3, scores


def test_preconditioned_update_whitens_the_gradient_at_mlp_outputs_and_travels_with_the_checkpoint(tiny_gpt2,
                                                                                                  tmp_path):
    """precondition: at the MLP output projection the gradient's input factor is x M, M = (C + ρ·c̄·I)⁻¹·c̄ from
    the inputs' second moment; the MLP input projection keeps the plain gradient. M is saved with the editor,
    so a checkpoint applied to a freshly loaded model gives the trained network's edit."""
    from lethe.covariance import layer_covariance
    from lethe.hypernetworks import site_key

    texts = [" ".join(f"w{(7 * i + 3 * j) % 60}" for j in range(12)) for i in range(40)]
    L.seed_everything(0)
    module = KnowledgeEditorModule(tiny_gpt2, layers=[-1], smoothing=0.0, lr=1e-2, precondition=True,
                                   precondition_corpus=texts, precondition_samples=40, precondition_ridge=0.05)
    net = module.net
    outs = [s for s in module.sites if site_key(s) in net.preconditioned]
    assert len(outs) == 1 and outs[0].module.endswith("mlp.c_proj") and len(module.sites) == 2
    site = outs[0]
    cov = layer_covariance(module.model, module.tokenizer, module.adapter, module.family, 1, corpus=texts,
                           n_samples=40, source=module.model_source).to(torch.float64)
    mean = float(torch.diagonal(cov).mean())
    m = getattr(net, f"whiten__{site_key(site)}").to(torch.float64)
    torch.testing.assert_close(m @ (cov + 0.05 * mean * torch.eye(cov.shape[0], dtype=torch.float64)),
                               mean * torch.eye(cov.shape[0], dtype=torch.float64), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(m, torch.eye(m.shape[0], dtype=torch.float64), atol=1e-2)
    reqs = REQS[:1]
    batch = lm.encode_pairs(module.tokenizer, module.family, [reqs[0].rewrite_prompt], [reqs[0].target_new])
    fac = gradient_factors(module.model, module.family, module.sites, batch)
    net.eval()
    with torch.no_grad():
        got = net.deltas(module.model, module.tokenizer, module.family, reqs)[0]
        c = net.condition(module.model, module.tokenizer, reqs)[0]
        for s in module.sites:
            x, d = fac.select(s, [0])
            grad = d.T @ (x @ m.float() if s is site else x)
            torch.testing.assert_close(got[s.param], net.update_for(s, c, grad), rtol=1e-4, atol=1e-7)
    _applied_as_trained(module, fit(module, steps=2), tmp_path / "ke_pc.ckpt", tiny_gpt2, REQS[:2])
    with pytest.raises(ValueError, match="kinds needs mlp_out"):
        KnowledgeEditorModule(tiny_gpt2, layers=[-1], kinds=["mlp_in"], precondition=True, precondition_corpus=texts)
