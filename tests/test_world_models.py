"""The embedded world models: deterministic builds, cache reuse, and aliases through the one loader."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lethe import lm
from lethe.models import load_model
from lethe.world_models import (
    BUILD_THREADS,
    FAMILIES,
    RECIPES,
    build_info,
    ensure_world_model,
    load_world,
    model_dir,
    weights_fingerprint,
)

QUICK = {"epochs": 1, "width": 32, "layers": 1, "ffn": 64, "heads": 2}


@pytest.mark.parametrize("family", FAMILIES)
def test_quick_build_is_reproducible_and_cached(tmp_path, family):
    """Two fresh builds in two cache folders, called with 1 and with 3 threads: the same weights (the build
    trains with BUILD_THREADS threads and deterministic algorithms, then restores the caller's settings)."""
    outer = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ensure_world_model(family, cache=tmp_path / "a", recipe=QUICK, progress=False)
        assert torch.get_num_threads() == 1 and not torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(3)
        b = ensure_world_model(family, cache=tmp_path / "b", recipe=QUICK, progress=False)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(outer)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed, same weights
    info = build_info(a)
    assert info["weights_fingerprint"] == build_info(b)["weights_fingerprint"] == weights_fingerprint(a)
    assert info["threads"] == BUILD_THREADS
    assert info["world_fingerprint"] == load_world().fingerprint() and info["steps"] > 0
    # a second call reuses the cache: nothing is rebuilt
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert ensure_world_model(family, cache=tmp_path / "a", recipe=QUICK) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime
    loaded = load_model(a)
    assert loaded.family == family and len(loaded.tokenizer) == loaded.model.get_input_embeddings().weight.shape[0]
    assert model_dir(family, tmp_path / "a") != a  # the default recipe has its own folder


def test_a_build_from_another_recipe_is_rebuilt(tmp_path):
    path = ensure_world_model("decoder", cache=tmp_path, recipe=QUICK, progress=False)
    info = build_info(path)
    info["recipe"]["lr"] = 1.0  # as if an older lethe had built this folder with another default
    (path / "lethe_build.json").write_text(json.dumps(info))
    assert ensure_world_model("decoder", cache=tmp_path, recipe=QUICK, progress=False) == path
    assert build_info(path)["recipe"]["lr"] == QUICK.get("lr", RECIPES["decoder"]["lr"])


def test_bad_recipe_key(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe keys"):
        ensure_world_model("decoder", cache=tmp_path, recipe={"epochz": 1})


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_world_models_know_their_training_facts(family):
    """The default models (built once, cached) recall >= 95% of a sample of their training facts."""
    loaded = load_model(f"lethe:world-{family}")
    world = load_world()
    facts = world.train_facts[::7]
    prompts = [world.training_prompts(f)[0] for f in facts]
    hits = lm.greedy_match(loaded.model, loaded.tokenizer, family, prompts, [f.object for f in facts])
    assert hits.float().mean() >= 0.95
    unseen = world.unseen_facts
    miss = lm.greedy_match(loaded.model, loaded.tokenizer, family, [world.training_prompts(f)[0] for f in unseen],
                           [f.object for f in unseen])
    assert miss.float().mean() < 0.5  # facts never trained on are not known: they serve as unseen text


def test_a_build_that_does_not_know_its_facts_trains_more_and_otherwise_caches_nothing(tmp_path, monkeypatch):
    """Under RECALL_FLOOR after its epochs, a build trains TOP_UP_EPOCHS more (up to MAX_TOP_UPS times); one that
    still falls short raises, naming the recall and the folder, and leaves nothing in the cache."""
    import lethe.world_models as wm

    monkeypatch.setattr(wm, "TOP_UP_EPOCHS", 1)
    monkeypatch.setattr(wm, "MAX_TOP_UPS", 1)
    calls = []
    real = wm.training_recall
    monkeypatch.setattr(wm, "training_recall", lambda *a: calls.append(real(*a)) or calls[-1])
    monkeypatch.setitem(wm.RECIPES, "decoder", {**wm.RECIPES["decoder"], "epochs": 1})  # the floor: defaults only
    with pytest.raises(RuntimeError, match=r"recalls only 0\.\d+ of its training facts after 1 more epochs"):
        wm.ensure_world_model("decoder", cache=tmp_path, progress=False)
    assert len(calls) == 2 and calls[0] < wm.RECALL_FLOOR  # measured after the epochs and after the top-up
    dest = wm.model_dir("decoder", tmp_path)
    assert not dest.exists() and not (dest.parent / f".{dest.name}-init").exists()  # not even the initial weights
