"""Writing results so that nothing already written is lost or half-overwritten.

Every file or folder lethe produces is first written beside its destination
and then moved into place with one ``os.replace``; an interrupted write leaves
the previous version (or nothing), never a truncated file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# lethe's bundled data files (one name for each, used by every module that reads them)
DATA_DIR = Path(__file__).resolve().parent / "data"
REAL_FACTS = DATA_DIR / "real_facts.json"  # CounterFact-format real-world facts SmolLM2 knows
FACT_BANK = DATA_DIR / "fact_bank.json"  # the larger bank (725 facts SmolLM2 knows), split by subject
REFUSALS = DATA_DIR / "refusals.txt"  # IdkDPO's "I don't know"-style answers, one per line
MEMORISED_PASSAGES = DATA_DIR / "memorised_passages.json"  # texts SmolLM2 memorised vs unseen texts


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it replaces ``dest`` in one step."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        # mkstemp/mkdtemp create private (0600/0700) entries; give the result the permissions an ordinary
        # open()/mkdir() would have had, so a shared results or model folder stays readable
        if tmp.exists():
            tmp.chmod((0o777 if is_dir else 0o666) & ~_umask())
        if is_dir:  # and what was written inside (some writers, safetensors among them, create 0600 files)
            for sub in tmp.rglob("*"):
                if not sub.is_symlink():
                    sub.chmod((0o777 if sub.is_dir() else 0o666) & ~_umask())
        if is_dir and dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")
    return Path(path)


def save_png(fig, dest: str | os.PathLike, dpi: int = 100) -> Path:
    """Lay out a matplotlib figure, write it atomically as PNG (creating the folder) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return dest


def save_pretrained(model, tokenizer, dest: str | os.PathLike) -> Path:
    """Save a Hugging Face model (+ tokenizer) folder atomically, as safetensors."""
    with atomic_path(dest, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(dest)


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """lethe's cache: the argument, else $LETHE_CACHE, else ~/.cache/lethe."""
    root = Path(override or os.environ.get("LETHE_CACHE") or Path.home() / ".cache" / "lethe")
    root.mkdir(parents=True, exist_ok=True)
    return root


def tofu_dir(override: str | os.PathLike | None = None) -> Path:
    """Where a local copy of TOFU's JSON files is: the argument, else $LETHE_TOFU_DIR, else ``shared/data/tofu``
    beside this checkout (the project's layout). Not checked for existence here."""
    if override or os.environ.get("LETHE_TOFU_DIR"):
        return Path(override or os.environ["LETHE_TOFU_DIR"])
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock between processes (two jobs never build the same cached model at once)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
