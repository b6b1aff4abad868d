"""The README's Python snippets run as pasted (issue 23): each ```python
block, from a directory whose etc/cluster.toml is a running test cluster's
(as the project root is next to `make run`'s cluster)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import LocalCluster

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


def snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def test_the_readme_has_python_snippets() -> None:
    found = snippets()
    assert len(found) >= 3 and any("AsyncClient" in s for s in found) and any("RawNode" in s for s in found)


def test_every_python_snippet_of_the_readme_runs_as_pasted(tmp_path: Path) -> None:
    local = LocalCluster(tmp_path / "cluster", hosts=3, groups=1, replicas=3)
    workdir = tmp_path / "project"
    (workdir / "etc").mkdir(parents=True)
    shutil.copy(local.config_path, workdir / "etc" / "cluster.toml")
    with local.running():
        for number, snippet in enumerate(snippets(), start=1):
            ran = subprocess.run([sys.executable, "-c", snippet], cwd=workdir, capture_output=True, text=True,
                                 timeout=60)
            assert ran.returncode == 0, f"README snippet {number} failed:\n{snippet}\n{ran.stdout}{ran.stderr}"
