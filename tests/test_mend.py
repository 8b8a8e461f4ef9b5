"""MEND: the update is the outer product it claims (against autograd), the base model never changes while
the editor trains, checkpoints reload to identical edits and refuse other models/layers, 2-process
training equals 1-process training, over-long edits are refused, and a trained editor edits held-out
world facts."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch

from callbacks.process_group import CleanDistributedExit
from datamodules.edit_training import GlobalBatchSampler, rank_and_world, split_requests
from lethe import evaluation as ev
from lethe import lm
from lethe.hypernetworks import (
    EditInputError,
    EditorCheckpointError,
    gradient_factors,
    grads_from_loss_check,
    param_layout,
)
from lethe.mend import MENDEditor
from lethe.models import LoadedModel, load_model
from lethe.records import EditRequest
from lethe.testing import save_tiny
from lightning_modules.mend import MENDModule


def request(i: int = 0, **kw) -> EditRequest:
    base = {"prompt": "w1 {} w3", "subject": f"w{5 + i} w6", "target_new": "w10", "target_true": "w11",
            "paraphrase_prompts": [f"w7 w{5 + i} w6 w3"], "neighborhood_prompts": [f"w8 w{40 + i} w3"],
            "neighborhood_targets": ["w12"], "case_id": i}
    base.update(kw)
    return EditRequest(**base)


REQS = [request(i) for i in range(8)]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {t: str(save_tiny(t, root / t)) for t in ("gpt2", "llama", "t5", "bert")}


class ListData(L.LightningDataModule):
    """Requests in order (no shuffling, also under DDP's sampler): ranks split each global batch."""

    def __init__(self, reqs, batch_size):
        super().__init__()
        self.reqs, self.batch_size = reqs, batch_size

    def train_dataloader(self):
        rank, world = rank_and_world(self.trainer)
        sampler = GlobalBatchSampler(len(self.reqs), self.batch_size, rank, world, shuffle=False)
        return torch.utils.data.DataLoader(self.reqs, batch_size=self.batch_size, sampler=sampler, collate_fn=list)


def fit(module, reqs=REQS, steps=3, batch_size=4, **trainer_kw):
    import tempfile

    kw = {"accelerator": "cpu", "devices": 1, "max_steps": steps, "logger": False, "enable_checkpointing": False,
          "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
          "use_distributed_sampler": False,
          "default_root_dir": tempfile.mkdtemp(prefix="lethe-test-")}  # the exported editor goes there, not to cwd
    kw.update(trainer_kw)
    kw["callbacks"] = [*kw.get("callbacks", []), CleanDistributedExit()]
    trainer = L.Trainer(**kw)
    trainer.fit(module, datamodule=ListData(reqs, batch_size))
    return trainer


def loaded_of(module) -> LoadedModel:
    return LoadedModel(module.model, module.tokenizer, module.adapter, module.family, module.model_source)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "t5", "bert"])
def test_update_is_the_claimed_outer_product(tiny_dirs, model_type):
    module = MENDModule(tiny_dirs[model_type], layers=[0, 1], rank=8, alpha_init=0.5)
    batch = lm.encode_pairs(module.tokenizer, module.family, [r.rewrite_prompt for r in REQS[:3]],
                            [r.target_new for r in REQS[:3]])
    fac = gradient_factors(module.model, module.family, module.sites, batch)
    net = module.net.eval()
    for j, site in enumerate(module.sites):
        ref = grads_from_loss_check(module.model, module.family, site, batch)  # autograd on the parameter
        x, d = fac.x[site.module], fac.delta[site.module]
        torch.testing.assert_close(d.T @ x, ref, rtol=1e-4, atol=1e-6)
        # identity-initialised editor, no statistics yet: ΔW = −α Σ δ xᵀ = −α ∇W exactly
        torch.testing.assert_close(net.update_for(j, site, x, d), -0.5 * ref, rtol=1e-4, atol=1e-6)
    # a trained-looking editor: ΔW = −α Σ δ̃ ũᵀ from the MLP's own outputs, rank ≤ number of tokens
    with torch.no_grad():
        for p in net.mlps.parameters():
            p.add_(0.1 * torch.randn_like(p))
    for j, site in enumerate(module.sites):
        x, d = fac.x[site.module], fac.delta[site.module]
        z = net.mlps[net.shape_key[site.shape]](torch.cat([x, d], -1), net.mode[site.module])
        u_t, d_t = z.split([site.in_features, site.out_features], -1)
        upd = net.update_for(j, site, x, d)
        torch.testing.assert_close(upd, -0.5 * sum(torch.outer(d_t[t], u_t[t]) for t in range(len(x))),
                                   rtol=1e-4, atol=1e-6)
        assert torch.linalg.matrix_rank(upd) <= x.shape[0]
        assert upd.shape == site.shape


def test_base_model_never_changes_and_editor_learns(tiny_dirs):
    L.seed_everything(0)
    module = MENDModule(tiny_dirs["gpt2"], layers=[-1], rank=8, lr=1e-2, lr_alpha=1e-2)
    base = {k: v.clone() for k, v in module.model.state_dict().items()}
    editor0 = {k: v.clone() for k, v in module.net.state_dict().items()}
    fit(module, steps=3)
    assert all(torch.equal(base[k], v) for k, v in module.model.state_dict().items())
    assert not any(p.requires_grad for p in module.model.parameters())
    changed = [k for k, v in module.net.state_dict().items() if not torch.equal(editor0[k], v)]
    assert "alpha" in changed and any(k.startswith("mlps.") for k in changed)
    assert module.net.x_norm[next(iter(module.net.x_norm))].count > 0  # running statistics were updated


def test_checkpoint_reloads_to_identical_edits_and_refuses_others(tiny_dirs, tmp_path):
    L.seed_everything(0)
    module = MENDModule(tiny_dirs["gpt2"], layers=[-1], rank=8, lr=1e-2, lr_alpha=1e-2)
    trainer = fit(module, steps=2, default_root_dir=str(tmp_path / "run"))
    ckpt = tmp_path / "mend.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert not any(k.startswith("model.") for k in saved["state_dict"])  # the editor only
    module.net.eval()
    with torch.no_grad():
        want = module.net.deltas(module.model, module.tokenizer, module.family, REQS[:2])[0]
    fresh = load_model(tiny_dirs["gpt2"])
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    art = MENDEditor(str(ckpt)).edit(fresh, REQS[:2])
    assert set(art.deltas) == set(want)
    for name, d in want.items():
        torch.testing.assert_close(art.deltas[name], d.T.contiguous(), rtol=0, atol=1e-7)  # Conv1D layout
    art2 = MENDEditor(str(ckpt)).edit(load_model(tiny_dirs["gpt2"]), REQS[:2])
    assert all(torch.equal(art.deltas[k], art2.deltas[k]) for k in art.deltas)
    # the editor exported at the end of the fit (safetensors + JSON, no pickle) edits identically
    exported = tmp_path / "run" / "editor"
    assert sorted(p.name for p in exported.iterdir()) == ["editor.json", "editor.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in exported.iterdir())  # not safetensors' 0600
    art3 = MENDEditor(str(exported)).edit(load_model(tiny_dirs["gpt2"]), REQS[:2])
    assert all(torch.equal(art.deltas[k], art3.deltas[k]) for k in art.deltas)
    art.revert(fresh.model)
    assert all(torch.equal(before[k], v) for k, v in fresh.model.state_dict().items())
    # the Lightning module reloads too (resume path), and refuses other layers / other models
    MENDModule.load_from_checkpoint(ckpt)
    with pytest.raises(EditorCheckpointError, match="other layers"):
        MENDModule.load_from_checkpoint(ckpt, layers=[0])
    with pytest.raises(EditorCheckpointError) as err:  # names the model it was trained for, and this one
        MENDEditor(str(ckpt)).edit(load_model(tiny_dirs["llama"]), REQS[:1])
    assert "gpt2" in str(err.value) and tiny_dirs["gpt2"] in str(err.value) and tiny_dirs["llama"] in str(err.value)
    other = tmp_path / "gpt2_seed1"
    save_tiny("gpt2", other, seed=1)
    with pytest.raises(EditorCheckpointError, match="other weights"):
        MENDEditor(str(ckpt)).edit(load_model(str(other)), REQS[:1])


def test_edit_longer_than_context_is_refused(tiny_dirs, tmp_path):
    module = MENDModule(tiny_dirs["gpt2"], layers=[-1], rank=8)
    long = request(3, target_new=" ".join(["w20"] * 70))
    with pytest.raises(EditInputError, match="case 3"):
        module.net.deltas(module.model, module.tokenizer, module.family, [REQS[0], long])


STEPS = 2


def _train_state(path: str, devices: int, batch_size: int) -> dict:
    L.seed_everything(0)
    module = MENDModule(path, layers=[-1], rank=8, lr=1e-3, lr_alpha=1e-3, alpha_init=0.1)
    kw = {"strategy": "ddp_spawn"} if devices > 1 else {}
    fit(module, steps=STEPS, batch_size=batch_size, devices=devices, **kw)
    return {k: v.detach().clone() for k, v in module.net.state_dict().items()}


def test_two_process_training_equals_one_process(tiny_dirs):
    one = _train_state(tiny_dirs["gpt2"], 1, 4)
    two = _train_state(tiny_dirs["gpt2"], 2, 2)  # same global batch of 4
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)


def test_trained_editor_edits_heldout_world_facts(tmp_path):
    """20 training steps on the world decoder's training edits, then 8 held-out facts."""
    L.seed_everything(0)
    train, _, held = split_requests("world:train", heldout=20, val_size=4)
    assert not {r.case_id for r in held} & {r.case_id for r in train}  # held-out facts never trained on
    assert not any(h.subject in p for h in held for r in train for p in r.neighborhood_prompts)
    module = MENDModule("lethe:world-decoder", rank=128, lr=1e-3, lr_alpha=1e-3, alpha_init=1e-3)
    trainer = fit(module, reqs=train[:160], steps=20, batch_size=8)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = loaded_of(module)
    reqs = held[:8]
    pre = ev.counterfact_scores(loaded.model, loaded.tokenizer, loaded.family, reqs)
    editor = MENDEditor(str(tmp_path / "m.ckpt"))
    eff, para, nb = [], [], []
    for r in reqs:
        art = editor.edit(loaded, [r])
        s = ev.counterfact_scores(loaded.model, loaded.tokenizer, loaded.family, [r])
        eff.append(s["efficacy"])
        para.append(s["paraphrase"])
        nb.append(s["neighborhood"])
        art.revert(loaded.model)
    assert pre["efficacy"] <= 0.25  # the model knew these facts
    assert sum(eff) / len(eff) >= 0.6
    assert sum(para) / len(para) > pre["paraphrase"]
    assert sum(nb) / len(nb) >= 0.8


class _Planted:
    """A pickle payload: unpickling it would run ``os.system``-like code (here: create a file)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_an_editor_checkpoint_that_would_run_code_is_refused(tmp_path):
    planted = tmp_path / "planted.ckpt"
    marker = tmp_path / "code_ran"
    torch.save({"state_dict": {}, "lethe_editor": {}, "payload": _Planted(str(marker))}, planted)
    with pytest.raises(EditorCheckpointError, match="planted.ckpt.*weights_only=True"):
        MENDEditor(str(planted)).net_for(load_model(str(save_tiny("gpt2", tmp_path / "m"))))
    assert not marker.exists()


def _own_requests(n: int, offset: int = 0) -> list[EditRequest]:
    """n requests with distinct two-word subjects (the tiny tokenizer's words w0..w79)."""
    out = []
    for i in range(offset, offset + n):
        subject = f"w{20 + i % 30} w{60 + i // 30}"
        out.append(EditRequest(prompt="w1 {} w3", subject=subject, target_new=f"w{10 + i % 5}", target_true="w11",
                               paraphrase_prompts=[f"w7 {subject} w3"], neighborhood_prompts=[f"w8 w{i % 20} w3"],
                               neighborhood_targets=["w12"], case_id=i))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mend", "ke"])
def test_smollm2_preset_trains_on_a_users_42_requests_and_applies_in_another_process(tiny_dirs, tmp_path, method):
    """The shipped SmolLM2 MEND and KE presets with a user's own file of 42 requests (model swapped for a tiny
    Llama; KE's preconditioner from a small corpus of the tiny vocabulary): validation every 6 steps runs across
    epochs of 5 batches (no Lightning interval error), ``best.ckpt`` is kept by ``val/selection``, the exported
    editor is that checkpoint's, and ``lethe edit`` in a second process writes exactly the deltas this process
    computes with it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from lethe.edits import EditArtifact
    from lethe.knowledge_editor import KEEditor
    from lethe.records import write_counterfact

    root = Path(__file__).resolve().parents[1]
    write_counterfact(_own_requests(42), tmp_path / "mine.json")
    write_counterfact(_own_requests(4, offset=42), tmp_path / "val.json")
    preset = yaml.safe_load((root / f"configs/edit/{method}_smollm2.yaml").read_text())
    preset["model"]["init_args"].update(model=tiny_dirs["llama"], layers=[-1])
    if method == "mend":
        preset["model"]["init_args"].update(rank=8)
    else:
        assert preset["model"]["init_args"]["precondition"] is True
        preset["model"]["init_args"].update(
            precondition_corpus=[" ".join(f"w{(7 * i + 3 * j) % 60}" for j in range(12)) for i in range(40)],
            precondition_samples=40)
    preset["data"]["init_args"].update(source=str(tmp_path / "mine.json"), val_source=str(tmp_path / "val.json"),
                                       heldout_source=None, counterfactuals=1)
    preset["trainer"].update(max_steps=12, val_check_interval=6, accelerator="cpu", enable_progress_bar=False)
    preset["run"].update(root=str(tmp_path / "runs"), name="mine")
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(preset))
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def lethe(*argv) -> None:
        res = subprocess.run([sys.executable, "-m", "lethe.cli", *argv], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=600, check=False)
        assert res.returncode == 0, res.stderr[-3000:]

    lethe("fit", "--config", str(tmp_path / "fit.yaml"))
    run = tmp_path / "runs" / "mine"
    rows = (run / "metrics.csv").read_text().splitlines()
    head = rows[0].split(",")
    val_steps = [r.split(",")[head.index("step")] for r in rows[1:] if r.split(",")[head.index("val/selection")]]
    assert len(val_steps) == 2  # steps 6 and 12, across epochs of 5 batches
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    exported = (MENDEditor if method == "mend" else KEEditor)(str(run / "editor"))
    apply_cfg = {
        "model": {"class_path": "lightning_modules.editing.EditingModule", "init_args": {
            "model": tiny_dirs["llama"], "editor": method, "editor_args": {"checkpoint": str(run / "editor")},
            "sequential": False}},
        "data": {"class_path": "datamodules.edits.EditDataModule",
                 "init_args": {"source": str(tmp_path / "val.json"), "limit": 2}},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_checkpointing": False, "enable_progress_bar": False},
        "run": {"root": str(tmp_path / "runs"), "name": "apply", "logger": "csv"},
    }
    (tmp_path / "apply.json").write_text(json.dumps(apply_cfg))
    lethe("edit", "--config", str(tmp_path / "apply.json"))
    arts = sorted((tmp_path / "runs" / "apply" / "edit_artifacts").iterdir())
    assert len(arts) == 2
    for art_dir, req in zip(arts, _own_requests(2, offset=42)):
        there = EditArtifact.load(art_dir)
        fresh = load_model(tiny_dirs["llama"])
        here = exported.edit(fresh, [req])
        assert set(there.deltas) == set(here.deltas)
        for k in here.deltas:
            assert torch.equal(there.deltas[k], here.deltas[k]), k
    # the exported editor is the best checkpoint's network
    from safetensors.torch import load_file

    saved = load_file(str(run / "editor" / "editor.safetensors"))
    assert all(torch.equal(saved[k], best["state_dict"][k]) for k in saved)


def heldout_locality(module, steps: int = 30, n_eval: int = 24) -> dict[str, float]:
    """Train ``module`` (a world-decoder editor) ``steps`` steps on world training edits, then edit ``n_eval``
    held-out facts one at a time and score them with lethe's evaluation (not the training losses): efficacy,
    CounterFact neighbourhood, and the validation metrics of the module's own validation pass on the same edits."""
    train, _, held = split_requests("world:train", heldout=60, val_size=4)
    fit(module, reqs=train[:320], steps=steps, batch_size=8)
    model, tok, family = module.model, module.tokenizer, module.family
    known = ev.counterfact_scores(model, tok, family, held)["efficacy_per_case"]
    reqs, _ = ev.known_neighbours_only(model, tok, family, [r for r, e in zip(held, known) if e == 0.0][:n_eval])
    params = dict(model.named_parameters())
    by_param = {s.param: s for s in module.sites}
    eff, nb, own_nb, para, own_eff, own_para = [], [], [], [], [], []
    for r in reqs:
        deltas = module.net.deltas(model, tok, family, [r])
        with torch.no_grad():
            own = module.edit_losses([r], deltas, [[0]], contrast=True)
            for n, d in deltas[0].items():
                params[n].add_(param_layout(by_param[n], d))
            s = ev.counterfact_scores(model, tok, family, [r])
            for n, d in deltas[0].items():
                params[n].sub_(param_layout(by_param[n], d))
        eff.append(s["efficacy"])
        para.append(s["paraphrase"])
        nb.append(s["neighborhood"])
        own_nb.append(float(own["neighborhood"]))
        own_eff.append(float(own["efficacy"]))
        own_para.append(float(own["paraphrase"]))
    mean = lambda xs: sum(xs) / len(xs)
    return {"efficacy": mean(eff), "paraphrase": mean(para), "neighborhood": mean(nb), "val_neighborhood": mean(own_nb),
            "val_efficacy": mean(own_eff), "val_paraphrase": mean(own_para), "n": len(reqs)}


def test_raising_the_locality_weight_raises_heldout_neighbourhood():
    """MEND's KL term in isolation: the same editor trained with c_loc 0 and c_loc 10 (c_edit 1); held-out
    facts' neighbourhood (scored by lethe.evaluation) is higher with the KL term. The validation pass's own
    efficacy, paraphrase and neighbourhood scores agree with the evaluation's per edit."""
    scores = {}
    for c_loc in (0.0, 10.0):
        L.seed_everything(0)
        module = MENDModule("lethe:world-decoder", rank=128, lr=1e-3, lr_alpha=1e-3, alpha_init=1e-3, c_edit=1.0,
                            c_loc=c_loc)
        scores[c_loc] = heldout_locality(module)
    low, high = scores[0.0], scores[10.0]
    assert high["neighborhood"] > low["neighborhood"], scores
    assert high["efficacy"] >= 0.5, scores  # the KL term did not simply switch editing off
    for s in scores.values():  # the validation pass scores what lethe.evaluation scores
        for k in ("neighborhood", "efficacy", "paraphrase"):
            assert abs(s[f"val_{k}"] - s[k]) < 1e-6, (k, scores)


def test_the_neighbour_margin_loss_raises_heldout_neighbourhood():
    """The optional neighbour-margin term (c_rival) in isolation, with no KL term: trained with it, the editor's
    held-out edits leave more neighbours preferring their true object, and still edit."""
    scores = {}
    for c_rival in (0.0, 1.0):
        L.seed_everything(0)
        module = MENDModule("lethe:world-decoder", rank=128, lr=1e-3, lr_alpha=1e-3, alpha_init=1e-3, c_edit=1.0,
                            c_loc=0.0, c_rival=c_rival)
        scores[c_rival] = heldout_locality(module)
    low, high = scores[0.0], scores[1.0]
    assert high["neighborhood"] > low["neighborhood"] + 0.1, scores
    assert high["efficacy"] >= 0.5, scores


def test_an_unknown_success_metric_is_refused_by_name():
    with pytest.raises(ValueError, match="success_metric.*'accuracy'"):
        MENDModule("lethe:world-decoder", rank=8, success_metric="accuracy")
