"""The embedded default models: tiny GPT-2, BERT and T5 pretrained by lethe on its own world.

Nothing here downloads anything. ``ensure_world_model("decoder")`` returns a
Hugging Face folder in lethe's cache, building it on first use (with a
progress bar) and reusing it afterwards. The build is deterministic: same
seed, same world, same weights on the same machine, whatever thread count the
caller runs with (the build trains with ``BUILD_THREADS`` intra-op threads and
deterministic algorithms, then restores the caller's setting). Each build stores
a fingerprint of its weights (``lethe_build.json``: ``weights_fingerprint``, with
the thread count, torch version and CPU capability it was built with);
benchmarks print it, so a stored result says which build it came from (another
CPU instruction set can round differently and give another fingerprint). A default build must recall
``RECALL_FLOOR`` of its training facts; one that does not trains further epochs until it does (a CPU whose
rounding landed the seq2seq build at 0.78 otherwise shipped a model that did not know its world). The folders are also
reachable as model names: ``lethe:world-decoder``, ``lethe:world-mlm``,
``lethe:world-seq2seq``.

``lethe world build [--cache DIR] [--family ...] [--force]`` builds them from
the command line; ``lethe world export DIR`` writes the world's records.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from lethe.io import atomic_path, cache_root, file_lock
from lethe.models import register_alias
from lethe.registry import import_object
from lethe.world import WORLD_SEED, World, load_world

FAMILIES = ("decoder", "mlm", "seq2seq")
STYLE = {"decoder": "gpt2", "mlm": "bert", "seq2seq": "t5"}
BUILD_VERSION = 1
# The Lightning job that pretrains a world model: the same LanguageModelModule and LMDataModule a preset names
# (configs/lm/world_decoder.yaml), by class path (lethe/ imports nothing from the outer packages).
TRAINING_JOB = {"model": "lightning_modules.lm.LanguageModelModule", "data": "datamodules.lm.LMDataModule"}

# Architecture and training recipe per family: small enough to train in a few CPU minutes,
# large enough to memorise ~2,000 facts.
RECIPES = {
    "decoder": {"arch": "gpt2", "width": 128, "layers": 4, "heads": 4, "ffn": 512,
                "epochs": 40, "lr": 2e-3, "batch_size": 64, "decay": False},
    "mlm": {"arch": "bert", "width": 128, "layers": 4, "heads": 4, "ffn": 512,
            "epochs": 40, "lr": 2e-3, "batch_size": 128, "decay": False},
    "seq2seq": {"arch": "t5", "width": 128, "layers": 3, "heads": 4, "ffn": 512,
                "epochs": 40, "lr": 2e-3, "batch_size": 64, "decay": True},
}


def world_cache_dir(cache: str | os.PathLike | None = None, seed: int = WORLD_SEED) -> Path:
    world = load_world(seed)
    return cache_root(cache) / "world" / f"seed{seed}-{world.fingerprint()[:10]}-v{BUILD_VERSION}"


def _recipe(family: str, overrides: dict | None) -> dict:
    unknown = set(overrides or {}) - set(RECIPES[family])
    if unknown:
        raise ValueError(f"unknown recipe keys {sorted(unknown)}; known: {sorted(RECIPES[family])}")
    return {**RECIPES[family], **(overrides or {})}


def model_dir(family: str, cache: str | os.PathLike | None = None, seed: int = WORLD_SEED,
              recipe: dict | None = None) -> Path:
    """The model's folder; a non-default recipe gets its own folder, keyed by the recipe."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    name = family
    if recipe:
        digest = hashlib.sha256(json.dumps(_recipe(family, recipe), sort_keys=True).encode()).hexdigest()[:8]
        name = f"{family}-{digest}"
    return world_cache_dir(cache, seed) / name


# A default build must know its training facts: greedy recall of every 7th training fact (first phrasing) at least
# RECALL_FLOOR, or the build trains TOP_UP_EPOCHS more (new warm-up and decay, same data and seed), at most
# MAX_TOP_UPS times. A build that reaches the floor at once is unchanged (same weights as before the top-up
# existed); on some CPUs the rounding sends the seq2seq build to 0.78 after its 40 epochs.
RECALL_FLOOR = 0.95  # the floor tests/test_world_models.py checks
TOP_UP_EPOCHS = 10
MAX_TOP_UPS = 4
BUILD_THREADS = 2  # intra-op threads while a world model trains (results must not depend on the machine's count)


def build_info(path: str | os.PathLike) -> dict:
    """The build record saved with a world model (seconds, recipe, world and weight fingerprints)."""
    return json.loads((Path(path) / "lethe_build.json").read_text())


def weights_fingerprint(path: str | os.PathLike) -> str:
    """A hash of a saved model's tensors (names, dtypes, shapes and bytes, in name order): equal
    fingerprints mean bit-identical weights."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(path) / "model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def build_record(family: str, cache: str | os.PathLike | None = None, seed: int = WORLD_SEED) -> dict:
    """What a benchmark prints about the world model it ran on: folder name, weight fingerprint, and how
    it was built (a build from before fingerprints were stored gets its fingerprint computed here)."""
    path = ensure_world_model(family, cache, seed, progress=False)
    info = build_info(path)
    return {"model": f"{path.parent.name}/{path.name}",
            "weights_fingerprint": info.get("weights_fingerprint") or weights_fingerprint(path),
            "threads": info.get("threads"), "torch": info.get("torch"), "cpu": info.get("cpu_capability")}


def world_builds(names) -> dict:
    """``{family: build_record}`` for the ``lethe:world-<family>`` names among ``names`` (other models are
    skipped), each also printed to stderr: a benchmark's result says which world build it ran on."""
    import sys

    out = {}
    for name in names:
        name = str(name or "")
        if name.startswith("lethe:world-") and name[len("lethe:world-"):] in FAMILIES:
            family = name[len("lethe:world-"):]
            out[family] = build_record(family)
            print(f"world build: {family} {out[family]['model']} weights {out[family]['weights_fingerprint']}",
                  file=sys.stderr, flush=True)
    return out


class _fixed_threads:
    """Run a block with ``n`` intra-op threads and deterministic algorithms, restoring both after."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        self.deterministic = torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(self.n)
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.threads)
        torch.use_deterministic_algorithms(self.deterministic)


def ensure_world_model(family: str, cache: str | os.PathLike | None = None, seed: int = WORLD_SEED,
                       force: bool = False, progress: bool = True, recipe: dict | None = None) -> Path:
    """The cached folder of the world model of ``family``, built first if missing (or ``force``).

    ``recipe`` overrides entries of ``RECIPES[family]`` (e.g. fewer epochs for a quick test).
    """
    dest = model_dir(family, cache, seed, recipe)
    wanted = _recipe(family, recipe)
    if not force and _is_current(dest, wanted):
        return dest
    with file_lock(dest.parent / f".{family}.lock"):
        if not force and _is_current(dest, wanted):  # another process built it meanwhile
            return dest
        if (dest / "lethe_build.json").is_file() and progress:
            print(f"lethe: the cached world {family} model in {dest} was built with another recipe; rebuilding")
        with _fixed_threads(BUILD_THREADS):
            # the floor holds the default models; a recipe of one's own (a quick test build) is taken as it is
            _build(family, dest, seed, progress, wanted, RECALL_FLOOR if wanted == RECIPES[family] else 0.0)
    return dest


def _is_current(dest: Path, recipe: dict) -> bool:
    """A cached build counts only if it was made with this recipe (a default changed by a lethe upgrade
    rebuilds the model instead of silently reusing the old one)."""
    try:
        return {"decay": False, **build_info(dest).get("recipe", {})} == recipe  # builds before "decay": off
    except (OSError, ValueError):
        return False


def _config(family: str, tokenizer, recipe: dict):
    import transformers as tf

    w, n, h, f = recipe["width"], recipe["layers"], recipe["heads"], recipe["ffn"]
    vocab = len(tokenizer)
    if family == "decoder":
        return tf.GPT2LMHeadModel, tf.GPT2Config(
            vocab_size=vocab, n_embd=w, n_layer=n, n_head=h, n_inner=f, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if family == "mlm":
        return tf.BertForMaskedLM, tf.BertConfig(
            vocab_size=vocab, hidden_size=w, num_hidden_layers=n, num_attention_heads=h, intermediate_size=f,
            max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            pad_token_id=tokenizer.pad_token_id)
    return tf.T5ForConditionalGeneration, tf.T5Config(
        vocab_size=vocab, d_model=w, d_ff=f, d_kv=w // h, num_layers=n, num_decoder_layers=2, num_heads=h,
        dropout_rate=0.0, feed_forward_proj="relu", pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)


def training_data(world: World, family: str) -> dict:
    """What each family learns: decoders whole sentences; MLM and seq2seq the object given the prompt."""
    if family == "decoder":
        return {"texts": world.training_corpus()}
    pairs = [[p, f.object] for f in world.train_facts for p in world.training_prompts(f)]
    return {"pairs": pairs}


def training_recall(model, tokenizer, family: str, world) -> float:
    """Greedy recall of every 7th training fact at its first training phrasing (what the build must reach)."""
    from lethe import lm

    facts = world.train_facts[::7]
    was_training = model.training
    model.eval()
    hits = lm.greedy_match(model, tokenizer, family, [world.training_prompts(f)[0] for f in facts],
                           [f.object for f in facts])
    model.train(was_training)
    return float(hits.float().mean())


def _build(family: str, dest: Path, seed: int, progress: bool, recipe: dict, floor: float = 0.0) -> None:
    import lightning as L

    from lethe.io import save_pretrained
    from lethe.tokenizers import build_world_tokenizer

    start = time.time()
    world = load_world(seed)
    tokenizer = build_world_tokenizer(world, STYLE[family])
    cls, config = _config(family, tokenizer, recipe)
    L.seed_everything(seed, workers=True, verbose=False)
    init = dest.parent / f".{dest.name}-init"
    save_pretrained(cls(config), tokenizer, init)
    module = import_object(TRAINING_JOB["model"])(model=str(init), lr=recipe["lr"], warmup_steps=50,
                                                  decay=recipe["decay"])
    data = import_object(TRAINING_JOB["data"])(**training_data(world, family), batch_size=recipe["batch_size"],
                                               max_length=48, add_eos=family == "seq2seq", seed=seed)
    def trainer_for(epochs: int):
        return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=progress, deterministic=True,
                         log_every_n_steps=50)

    trainer = trainer_for(recipe["epochs"])
    if progress:
        print(f"lethe: building the world {family} model ({recipe['arch']}) in {dest} — a few minutes, once")
    trainer.fit(module, datamodule=data)
    steps, top_ups = trainer.global_step, 0
    recall = training_recall(module.model, tokenizer, family, world)
    while recall < floor and top_ups < MAX_TOP_UPS:
        top_ups += 1
        if progress:
            print(f"lethe: the world {family} model recalls {recall:.3f} of its training facts (< {floor}); "
                  f"training {TOP_UP_EPOCHS} more epochs ({top_ups}/{MAX_TOP_UPS})")
        more = trainer_for(TOP_UP_EPOCHS)
        more.fit(module, datamodule=data)
        steps += more.global_step
        recall = training_recall(module.model, tokenizer, family, world)
    if recall < floor:
        shutil.rmtree(init, ignore_errors=True)
        raise RuntimeError(f"the world {family} model recalls only {recall:.3f} of its training facts after "
                           f"{TOP_UP_EPOCHS * MAX_TOP_UPS} more epochs (needs {floor}); nothing was cached "
                           f"in {dest}")
    module.model.eval()
    with atomic_path(dest, is_dir=True) as tmp:
        save_pretrained(module.model, tokenizer, tmp / "_m")
        for item in (tmp / "_m").iterdir():
            item.rename(tmp / item.name)
        (tmp / "_m").rmdir()
        info = {"family": family, "recipe": recipe, "seed": seed, "world_fingerprint": world.fingerprint(),
                "weights_fingerprint": weights_fingerprint(tmp), "threads": torch.get_num_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "build_seconds": round(time.time() - start, 1), "torch": torch.__version__,
                "steps": steps, "training_recall": round(recall, 4), "top_ups": top_ups}
        (tmp / "lethe_build.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(init, ignore_errors=True)


for _family in FAMILIES:
    register_alias(f"world-{_family}", functools.partial(ensure_world_model, _family))


def build_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="lethe world", description=__doc__)
    sub = parser.add_subcommands(dest="action")
    build = ArgumentParser(description="build (or reuse) the world models")
    build.add_argument("--cache", type=str | None, default=None,
                       help="cache folder (default $LETHE_CACHE or ~/.cache/lethe)")
    build.add_argument("--family", action="append", type=str, default=None,
                       help=f"only this family (repeatable), of {list(FAMILIES)} (default: all)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    export = ArgumentParser(description="write the world's records (CounterFact, zsRE, TOFU, text)")
    export.add_argument("directory", type=str)
    export.add_argument("--split", type=str, default="train", help="train, unseen or all")
    sub.add_subcommand("build", build, help="build (or reuse) the world models")
    sub.add_subcommand("export", export, help="write the world's records (CounterFact, zsRE, TOFU, text)")
    return parser


def main(argv: list[str] | None = None) -> None:
    import sys

    args = build_parser().parse_args(sys.argv[2:] if argv is None else argv)
    if args.action == "build":
        families = args.build.family or list(FAMILIES)
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise SystemExit(f"lethe world build: unknown --family {unknown}; choose from {list(FAMILIES)}")
        for family in families:
            path = ensure_world_model(family, cache=args.build.cache, force=args.build.force)
            print(f"{family}: {path} (built in {build_info(path)['build_seconds']} s)")
    else:
        split = args.export.split
        if split not in ("train", "unseen", "all"):
            raise SystemExit(f"lethe world export: --split {split!r}: use train, unseen or all")
        written = load_world().export(args.export.directory, split=None if split == "all" else split)
        for kind, path in written.items():
            print(f"{kind}: {path}")
