"""How well the embedded models know their world, and what SmolLM2 knows of the real one.

``python benchmarks/world_recall.py`` builds (or reuses) the world and its three models,
then prints, as its last line, one JSON object: for each world model, the greedy recall of
its training facts (every training phrasing), of the held-out paraphrases of those facts,
and of the unseen facts (never trained on: chance level is the point), and its build time;
for SmolLM2, the share of the real-fact set where it prefers the true target over the
counterfactual one on the rewrite prompt, and its conversion time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from lethe import lm
from lethe.io import DATA_DIR, REAL_FACTS
from lethe.models import load_model
from lethe.world_models import FAMILIES, build_info, ensure_world_model, load_world


def world_recall(family: str) -> dict:
    path = ensure_world_model(family)
    loaded = load_model(path)
    world = load_world()
    train = [(p, f.object) for f in world.train_facts for p in world.training_prompts(f)]
    para = [(p, f.object) for f in world.train_facts for p in world.paraphrase_prompts(f)]
    unseen = [(p, f.object) for f in world.unseen_facts for p in world.training_prompts(f)]
    # the model's name and its cache folder relative to the cache root: never a path of this machine
    out = {"build_seconds": build_info(path)["build_seconds"], "model": f"lethe:world-{family}",
           "cache_folder": str(path.relative_to(path.parents[2]))}
    t = time.time()
    for name, pairs in (("train_recall", train), ("paraphrase_recall", para), ("unseen_recall", unseen)):
        hits = lm.greedy_match(loaded.model, loaded.tokenizer, family, *zip(*pairs))
        out[name] = round(hits.float().mean().item(), 4)
        out[f"n_{name.split('_')[0]}"] = len(pairs)
    out["eval_seconds"] = round(time.time() - t, 1)
    return out


def smollm2_real_facts() -> dict:
    from lethe.records import read_counterfact
    from lethe.smollm2 import conversion_seconds, ensure_smollm2

    path = ensure_smollm2()
    loaded = load_model(path)
    facts = read_counterfact(REAL_FACTS)
    prompts = [r.rewrite_prompt for r in facts]
    p_true = lm.target_probability(loaded.model, loaded.tokenizer, "decoder", prompts, [r.target_true for r in facts])
    p_new = lm.target_probability(loaded.model, loaded.tokenizer, "decoder", prompts, [r.target_new for r in facts])
    greedy = lm.greedy_match(loaded.model, loaded.tokenizer, "decoder", prompts, [r.target_true for r in facts])
    # real_facts.json keeps the hand-written facts SmolLM2 knows; the share over ALL written candidates is in
    # its summary (scripts/score_real_facts.py, the same scorer)
    summary = json.loads((DATA_DIR / "real_facts_summary.json").read_text())
    return {"n_facts": len(facts), "prefers_true": round((p_true > p_new).float().mean().item(), 4),
            "greedy_true": round(greedy.float().mean().item(), 4),
            "candidates_written": summary["candidates"],
            "candidates_prefers_true": round(summary["share_true_preferred_all_candidates"], 4),
            "conversion_seconds": conversion_seconds(path)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--family", choices=FAMILIES, action="append")
    parser.add_argument("--no-smollm2", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result = {"world": {"fingerprint": load_world().fingerprint()[:16], "facts": len(load_world().facts)}}
    for family in args.family or FAMILIES:
        result[f"world_{family}"] = world_recall(family)
    if not args.no_smollm2:
        result["smollm2"] = smollm2_real_facts()
    from lethe.world_models import world_builds

    result["world_build"] = world_builds(f"lethe:world-{f}" for f in args.family or FAMILIES)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
