"""The README's two commands are what .ci/run runs, word for word."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)
    setup, test = blocks[0].strip(), blocks[1].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup in ci and test in ci
    assert ci.index(setup) < ci.index(test)
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()


def test_readme_results_table_is_generated_from_the_result_files():
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import results_table
    finally:
        sys.path.pop(0)
    readme = (ROOT / "README.md").read_text()
    assert results_table.readme_with_table(readme) == readme, "run: python scripts/results_table.py --write"
    assert len(results_table.rows()) >= 10


def test_readme_api_example_names_what_exists():
    """The Python API example's imports and the files the how-to sections name are real."""
    import importlib

    readme = (ROOT / "README.md").read_text()
    block = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)[0]
    for mod, names in re.findall(r"from ([\w.]+) import ([\w, ]+)", block):
        m = importlib.import_module(mod)
        for name in names.split(","):
            name = name.split(" as ")[0].strip()
            assert hasattr(m, name) or importlib.util.find_spec(f"{mod}.{name}"), (mod, name)
    for path in re.findall(r"`((?:lethe|lightning_modules|datamodules|callbacks|tests|benchmarks)/[\w/.]+\.py)", readme):
        assert (ROOT / path).is_file(), path
