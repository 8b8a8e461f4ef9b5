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
