"""Unlearning losses, LoRA, reference sharing, resume and bad input, on tiny models."""

from __future__ import annotations

import inspect
import json
import random
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from callbacks.forgetting import ForgettingTracker
from datamodules.forget_retain import ForgetRetainDataModule
from lethe import lm
from lethe import unlearning as UL
from lethe.testing import save_tiny
from lightning_modules.unlearning import UnlearningConfigError, UnlearningModule

ROOT = Path(__file__).resolve().parents[1]


def _texts(k: int, seed: int, lo: int = 6, hi: int = 10) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(60)}" for _ in range(rng.randrange(lo, hi))) for _ in range(k)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {t: str(save_tiny(t, root / t)) for t in ("gpt2", "bert", "t5")}


def _batch(module: UnlearningModule, texts: list[str]) -> dict:
    return lm.encode_texts(module.tokenizer, module.family, texts, seed=0)


def _train(module: UnlearningModule, batch: dict, steps: int) -> None:
    opt = module.configure_optimizers()
    module.model.train()
    for _ in range(steps):
        loss, _ = module.compute_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _nll(module, batch) -> float:
    with torch.no_grad():
        return lm.lm_loss(lm.forward_logits(module.model, batch, module.family), batch["labels"],
                          module.family).item()


@pytest.mark.parametrize("method", ["ga", "graddiff", "ga_kl", "npo", "simnpo"])
def test_each_loss_raises_forget_nll(tiny, method):
    m = UnlearningModule(tiny["gpt2"], method=method, lr=3e-3)
    forget, retain = _batch(m, _texts(4, 0)), _batch(m, _texts(4, 1))
    batch = {"forget": forget, "retain": retain}
    f0, r0 = _nll(m, forget), _nll(m, retain)
    _train(m, batch, 5)
    assert _nll(m, forget) > f0 + 0.05
    if method == "graddiff":  # the descent half keeps retain from rising as fast as forget
        assert _nll(m, retain) - r0 < _nll(m, forget) - f0


def test_retain_terms_pull_the_right_way(tiny):
    m = UnlearningModule(tiny["gpt2"], method="graddiff", lr=3e-3, forget_weight=0.0)
    retain = _batch(m, _texts(4, 1))
    r0 = _nll(m, retain)
    _train(m, {"forget": _batch(m, _texts(4, 0)), "retain": retain}, 5)
    assert _nll(m, retain) < r0 - 0.05
    kl = UnlearningModule(tiny["gpt2"], method="ga_kl")
    logits = lm.forward_logits(kl.model, retain, "decoder")
    assert UL.kl_to_reference(logits, logits, retain["labels"], "decoder").item() == pytest.approx(0.0, abs=1e-6)
    assert UL.kl_to_reference(logits, logits.flip(-1), retain["labels"], "decoder").item() > 0


def test_npo_and_simnpo_values():
    lp = torch.tensor([-3.0, -5.0])
    # at theta == ref: (2/beta) log 2
    assert UL.npo(lp, lp, 0.1).item() == pytest.approx(20 * torch.log(torch.tensor(2.0)).item())
    # lower forget likelihood than the reference -> smaller loss
    assert UL.npo(lp - 5, lp, 0.1) < UL.npo(lp, lp, 0.1)
    assert UL.simnpo(lp - 5, torch.tensor([3, 5]), 2.5) < UL.simnpo(lp, torch.tensor([3, 5]), 2.5)


def test_rmu_steers_forget_and_keeps_retain(tiny):
    m = UnlearningModule(tiny["gpt2"], method="rmu", lr=3e-3, rmu_layer=1, rmu_coef=5.0, retain_weight=10.0)
    forget, retain = _batch(m, _texts(4, 0)), _batch(m, _texts(4, 1))
    batch = {"forget": forget, "retain": retain}

    def terms():
        with torch.no_grad():
            _, logs = m.compute_loss(batch)
        return logs["forget_loss"].item(), logs["retain_loss"].item()

    f0, r0 = terms()
    assert r0 == pytest.approx(0.0, abs=1e-8)  # same weights as the reference
    _train(m, batch, 8)
    f1, r1 = terms()
    assert f1 < 0.7 * f0
    assert r1 < f1


@pytest.mark.parametrize("family_model", ["bert", "t5"])
def test_other_families_unlearn(tiny, family_model):
    m = UnlearningModule(tiny[family_model], method="graddiff", lr=3e-3)
    forget = lm.encode_pairs(m.tokenizer, m.family, ["w1 w2 w3", "w4 w5"], ["w7", "w8 w9"])  # QA-style targets
    retain = _batch(m, _texts(3, 1))
    f0 = _nll(m, forget)
    _train(m, {"forget": forget, "retain": retain}, 5)
    assert _nll(m, forget) > f0 + 0.05


def test_reference_shares_embeddings(tiny):
    m = UnlearningModule(tiny["gpt2"], method="npo")
    emb = m.adapter.embeddings(m.model).weight
    with m.reference() as ref:
        assert m.adapter.embeddings(ref).weight is emb
        other = next(p for n, p in ref.named_parameters() if "h.0.mlp" in n)
    assert not emb.requires_grad
    assert other is not dict(m.model.named_parameters())[next(n for n, _ in ref.named_parameters() if "h.0.mlp" in n)]
    assert not m._ref or all(not p.requires_grad for p in m._ref[0].parameters())


def test_lora_leaves_base_untouched_until_merged(tiny, tmp_path):
    m = UnlearningModule(tiny["gpt2"], method="npo", lr=1e-2, lora={"r": 4, "target_modules": ["c_attn", "c_fc"]})
    base = {n: p.detach().clone() for n, p in m.model.named_parameters() if "lora_" not in n}
    batch = {"forget": _batch(m, _texts(4, 0))}
    f0 = _nll(m, batch["forget"])
    _train(m, batch, 5)
    assert _nll(m, batch["forget"]) > f0
    for n, p in m.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n
    assert m._ref == []  # the reference is the LoRA base, no copy
    merged = m.merged_model()
    with torch.no_grad():
        want = lm.forward_logits(m.model, batch["forget"], "decoder")
        got = lm.forward_logits(merged, batch["forget"], "decoder")
    assert torch.allclose(want, got, atol=1e-5)
    w = "transformer.h.0.attn.c_attn.weight"
    base_w = next(v for k, v in base.items() if k.endswith("h.0.attn.c_attn.base_layer.weight"))
    assert not torch.equal(dict(merged.named_parameters())[w], base_w)
    adapter_dir = m.save_result(tmp_path / "adapter", "adapter")
    assert (adapter_dir / "adapter_config.json").is_file()
    assert not (adapter_dir / "model.safetensors").exists()
    assert (m.save_result(tmp_path / "merged", "merged") / "model.safetensors").is_file()


def _fit(model_dir: str, root: Path, max_steps: int, ckpt: str | None = None) -> dict:
    L.seed_everything(0)
    module = UnlearningModule(model_dir, method="graddiff", lr=3e-3)
    dm = ForgetRetainDataModule(forget_texts=_texts(8, 0), retain_texts=_texts(6, 1), unseen_texts=_texts(4, 2),
                                batch_size=2, seed=3)
    tracker = ForgettingTracker(every_n_steps=3, n=3, stop=False, report_dir=str(root))
    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root),
                        callbacks=[tracker, ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0,
                                                            every_n_train_steps=1)])
    trainer.fit(module, dm, ckpt_path=ckpt)
    return json.loads((root / "forgetting.json").read_text())


def test_killed_and_resumed_run_matches_uninterrupted(tiny, tmp_path):
    full = _fit(tiny["gpt2"], tmp_path / "a", 6)
    _fit(tiny["gpt2"], tmp_path / "b", 3)  # "killed" after step 3 (mid-epoch: 4 steps per epoch)
    resumed = _fit(tiny["gpt2"], tmp_path / "b", 6, ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert [r["step"] for r in resumed["history"]] == [r["step"] for r in full["history"]]
    for a, b in zip(full["history"], resumed["history"]):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k


def test_retain_batches_are_deterministic_sharded_and_sized(tiny):
    """k retain examples per forget example; two DDP ranks split the forget set without overlap; same seed,
    same batches; one epoch covers the retain set when forget * k >= retain."""
    from types import SimpleNamespace

    m = UnlearningModule(tiny["gpt2"], method="graddiff")

    def batches(rank: int, world: int, k: int, seed: int = 0) -> list[dict]:
        dm = _dm(m, forget_texts=_texts(8, 0), retain_texts=_texts(12, 1), batch_size=2, retain_per_forget=k,
                 seed=seed)
        dm.setup()
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(0)
        return list(loader)

    one = batches(0, 1, 3)
    assert len(one) == 4 and all(b["retain"]["input_ids"].shape[0] == 6 for b in one)
    assert {int(i) for b in one for i in b["retain"]["index"]} == set(range(12))  # 8 * 3 >= 12
    again = batches(0, 1, 3)
    assert all(torch.equal(a["retain"]["index"], b["retain"]["index"]) for a, b in zip(one, again))
    assert not all(torch.equal(a["retain"]["index"], b["retain"]["index"])
                   for a, b in zip(one, batches(0, 1, 3, seed=1)))
    shards = [[int(i) for b in batches(r, 2, 3) for i in b["forget"]["index"]] for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(8))
    assert all(b["retain"]["input_ids"].shape[0] == 2 for b in batches(0, 1, 1))
    with pytest.raises(ValueError, match="retain_per_forget=0"):
        ForgetRetainDataModule(forget_texts=_texts(2, 0), retain_per_forget=0)


# ---------------------------------------------------------------------- bad input


def _dm(module, **kw):
    dm = ForgetRetainDataModule(**kw)
    dm.tokenizer, dm.family = module.tokenizer, module.family
    return dm


def test_bad_input(tiny):
    m = UnlearningModule(tiny["gpt2"], method="ga")
    with pytest.raises(ValueError, match="forget set is empty"):
        _dm(m, forget_texts=[]).setup()
    world = _dm(m, builtin="world", n_forget=4, n_retain=8, n_unseen=4)  # the presets' builtin sets alone
    world.setup()
    assert world.sets["forget"] and world.sets["retain"] and world.sets["unseen"]
    texts = _texts(5, 0)
    with pytest.warns(UserWarning, match="2 of 3 retain examples also appear in the forget set"):
        _dm(m, forget_texts=texts, retain_texts=[texts[0], texts[1], "w1 w2"]).setup()
    dm = _dm(m, forget_texts=texts, retain_texts=[texts[0], "w1 w2"], drop_overlap=True)
    with pytest.warns(UserWarning, match="removed"):
        dm.setup()
    assert len(dm.sets["retain"]) == 1
    long = [" ".join(["w1"] * 40)]
    dm = _dm(m, forget_texts=long, max_length=16)
    with pytest.warns(UserWarning, match="longer than max_length=16 tokens"):
        dm.setup()
    assert dm.eval_batches("forget")[0]["input_ids"].shape[1] <= 16
    with pytest.raises(ValueError, match="longer than max_length=16"):
        _dm(m, forget_texts=long, max_length=16, on_long="error").setup()
    with pytest.raises(UnlearningConfigError, match="not an unlearning method"):
        UnlearningModule(tiny["gpt2"], method="forget_everything")
    gd = UnlearningModule(tiny["gpt2"], method="graddiff")
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    with pytest.raises(UnlearningConfigError, match="no retain set"):
        trainer.fit(gd, ForgetRetainDataModule(forget_texts=texts))


def test_presets_name_real_arguments():
    presets = sorted((ROOT / "configs" / "unlearn").glob("*.yaml"))
    assert len(presets) >= 8
    import importlib

    for p in presets:
        cfg = yaml.safe_load(p.read_text())
        for part in ("model", "data"):
            path, cls_name = cfg[part]["class_path"].rsplit(".", 1)
            cls = getattr(importlib.import_module(path), cls_name)
            allowed: set[str] = set()
            for klass in cls.__mro__:  # **kwargs passed on to a base class: its arguments count too
                if "__init__" not in vars(klass):
                    continue
                params = inspect.signature(klass.__init__).parameters
                allowed |= {n for n, q in params.items() if q.kind is not q.VAR_KEYWORD}
                if not any(q.kind is q.VAR_KEYWORD for q in params.values()):
                    break
            assert set(cfg[part].get("init_args", {})) <= allowed, (p.name, part, set(cfg[part]["init_args"]) - allowed)
        method = cfg["model"]["init_args"].get("method", "ga")
        from lethe.unlearning import needs_retain, resolve_method

        resolve_method(method, cfg["model"]["init_args"].get("retain_loss"))  # a known method, or it raises

        if needs_retain(method, cfg["model"]["init_args"].get("retain_loss")):
            d = cfg["data"]["init_args"]
            has = d.get("retain") or d.get("retain_texts") or d.get("retain_pairs") or d.get("builtin") == "world"
            assert has, p.name


def test_a_toy_objective_is_one_registered_function_and_one_yaml(tiny, tmp_path, monkeypatch):
    """Adding a loss: register one function, name it in a preset, run it through ``lethe fit``."""
    from lethe.cli import main
    from lethe.unlearning import FORGET

    seen = []

    def scaled_ascent(ctx, batch, scale: float = 1.0):
        seen.append(scale)
        return -scale * lm.lm_loss(ctx.logits(ctx.model, batch), batch["labels"], ctx.family)

    FORGET.register("toy_scaled_ascent", scaled_ascent)
    forget = _texts(4, 7)
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 3, "enable_progress_bar": False,
                    "log_every_n_steps": 1},
        "model": {"class_path": "lightning_modules.unlearning.UnlearningModule",
                  "init_args": {"model": tiny["gpt2"], "method": "toy_scaled_ascent", "method_args": {"scale": 2.0},
                                "lr": 1e-2, "save_dir": str(tmp_path / "out")}},
        "data": {"class_path": "datamodules.forget_retain.ForgetRetainDataModule",
                 "init_args": {"forget_texts": forget, "batch_size": 4}},
        "run": {"root": str(tmp_path / "runs"), "name": "toy"},
    }
    preset = tmp_path / "toy.yaml"
    preset.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    before = UnlearningModule(tiny["gpt2"])
    nll0 = _nll(before, _batch(before, forget))
    main(["fit", "--config", str(preset)])
    assert seen == [2.0] * 3  # three steps, with the preset's argument
    after = UnlearningModule(str(tmp_path / "out"))
    assert _nll(after, _batch(after, forget)) > nll0  # it ascended
    rows = (tmp_path / "runs" / "toy" / "metrics.csv").read_text().splitlines()
    assert rows[0].count("train/forget_loss") == 1 and len(rows) >= 4
    with pytest.raises(UnlearningConfigError, match="no argument"):
        UnlearningModule(tiny["gpt2"], method="toy_scaled_ascent", method_args={"temperature": 1.0})


def test_former_method_keywords_are_deprecated_aliases(tiny):
    with pytest.warns(DeprecationWarning, match="method_args"):
        m = UnlearningModule(tiny["gpt2"], method="npo", beta=0.3)
    assert m.forget_objective.beta == 0.3
    with pytest.warns(DeprecationWarning, match="rmu_layer"):
        r = UnlearningModule(tiny["gpt2"], method="rmu", rmu_layer=0, rmu_coef=3.0)
    assert (r.forget_objective.layer, r.forget_objective.coef) == (0, 3.0)
    assert torch.isclose(r.rmu_control.norm(), torch.tensor(3.0))


@pytest.mark.slow
def test_stop_rule_is_checked_every_step_and_keeps_the_crossing_steps_model(tmp_path):
    """GA on 8 facts of the world decoder, full measurements every 5 steps, the rule checked every step:
    the run stops at the first step where forget MA and EL are both at or below the unseen thresholds (not at
    the next multiple of 5), reports the step each threshold was first crossed, and ends on that step's model."""
    L.seed_everything(0)
    module = UnlearningModule("lethe:world-decoder", method="ga", lr=1e-3)
    dm = ForgetRetainDataModule(builtin="world", n_forget=8, n_retain=16, n_unseen=32, batch_size=8,
                                eval_batch_size=64)
    tracker = ForgettingTracker(every_n_steps=5, n=10, stop=True, report_dir=str(tmp_path))
    trainer = L.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                        callbacks=[tracker])
    trainer.fit(module, dm)
    report = json.loads((tmp_path / "forgetting.json").read_text())
    thr, checks = report["thresholds"], report["checks"]
    assert [c["step"] for c in checks[: report["stopped_at"]]] == list(range(1, report["stopped_at"] + 1))

    def below(c, key, metric):
        return c[f"forget/{metric}"] <= thr[key]

    both = [c["step"] for c in checks if below(c, "ma", "ma") and below(c, "el", "el10")]
    assert report["stopped_at"] == both[0] == trainer.global_step < 60
    assert report["crossed"]["ma"] == next(c["step"] for c in checks if below(c, "ma", "ma"))
    assert report["crossed"]["el"] == next(c["step"] for c in checks if below(c, "el", "el10"))
    final = report["history"][-1]  # the full measurement of the model the run ends with: the stopping step's
    assert final["step"] == report["stopped_at"]
    assert final["forget/ma"] == pytest.approx(checks[-1]["forget/ma"]) and "retain/ma" in final
    assert "retain MA" in tracker.summary_line() and f"step {report['stopped_at']}" in tracker.summary_line()


# ------------------------------------------------------------------------------------------ UNDIAL and IdkDPO


def test_undial_raises_forget_nll_towards_a_fixed_teacher_and_stays_bounded(tiny):
    m = UnlearningModule(tiny["gpt2"], method="undial", method_args={"beta": 5.0}, lr=1e-2, share_embeddings=False)
    forget = lm.encode_pairs(m.tokenizer, m.family, ["w1 w2 w3", "w4 w5"], ["w7 w8", "w9"])
    logits = lm.forward_logits(m.model, forget, m.family)
    # beta 0 at theta = reference: the cross-entropy of the model's own distribution, i.e. its entropy
    lg, lb = lm.aligned(logits, forget["labels"], m.family)
    p = torch.softmax(lg[lb != -100].float(), -1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert UL.undial(logits, logits.detach(), forget["labels"], m.family, beta=0.0).item() == pytest.approx(
        entropy.item(), rel=1e-5)
    # make the model (and its reference) confident on the forget answers first: UNDIAL removes the mass a
    # model puts on them, and a random tiny model puts almost none there
    opt = torch.optim.Adam([p for p in m.model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(60):
        loss = lm.lm_loss(lm.forward_logits(m.model, forget, m.family), forget["labels"], m.family)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m._ref[0].load_state_dict(m.model.state_dict())
    f0 = _nll(m, forget)
    assert f0 < 1.0
    losses = []
    for _ in range(10):
        _train(m, {"forget": forget}, 1)
        losses.append(m.compute_loss({"forget": forget})[0].item())
    assert _nll(m, forget) > f0 + 0.3
    assert all(0 < v < 20 for v in losses)  # a cross-entropy to a fixed teacher: bounded below by its entropy


def test_idk_dpo_swaps_the_answer_for_a_refusal_and_learns_to_prefer_it(tiny, tmp_path):
    refusals = tmp_path / "refusals.txt"
    refusals.write_text("# comment\nw30 w31\n\nw32\n")
    m = UnlearningModule(tiny["gpt2"], method="idk_dpo", method_args={"beta": 0.5, "refusals": str(refusals)},
                         lr=3e-3)
    forget = lm.encode_pairs(m.tokenizer, m.family, ["w1 w2 w3", "w4 w5"], ["w7 w8 w9", "w10"])
    forget["index"] = torch.tensor([0, 1])
    win = m.forget_objective.refusal_batch(m, forget)
    tok = m.tokenizer
    for i, want in enumerate(["w30 w31", "w32"]):
        real = win["attention_mask"][i].bool()
        prompt_len = int((forget["labels"][i][forget["attention_mask"][i].bool()] == -100).sum())
        assert win["input_ids"][i][:prompt_len].tolist() == forget["input_ids"][i][:prompt_len].tolist()
        answer = [t for t in win["labels"][i][real].tolist() if t != -100]
        assert tok.decode(answer).split() == want.split()
    loss0, _ = m.compute_loss({"forget": forget})
    assert loss0.item() == pytest.approx(2 / 0.5 * torch.log(torch.tensor(2.0)).item(), rel=1e-5)  # theta = ref
    f0, w0 = _nll(m, forget), _nll(m, win)
    _train(m, {"forget": forget}, 8)
    assert _nll(m, win) < w0 - 0.2 and _nll(m, forget) > f0 + 0.2
    with pytest.raises(UnlearningConfigError, match="idk_dpo.*decoder"):
        UnlearningModule(tiny["bert"], method="idk_dpo")
    with pytest.raises(UnlearningConfigError, match="no such file"):
        UnlearningModule(tiny["gpt2"], method="idk_dpo", method_args={"refusals": str(tmp_path / "none.txt")})
