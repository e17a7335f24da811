"""Every ```python block of docs/*.md and README.md runs, in order, one namespace per file, from
the repository root (so paths like ``graphs/data/...`` resolve).

A block whose first line is ``# doc: no-run`` is an illustrative fragment and is skipped.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NO_RUN = "# doc: no-run"


def _blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name) for p in FILES if p.exists()])
def test_python_blocks_run(path, monkeypatch):
    blocks = [b for b in _blocks(path) if not b.lstrip().startswith(NO_RUN)]
    if not blocks:
        pytest.skip("no python block")
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": f"docs_{path.stem}"}
    for index, code in enumerate(blocks):
        try:
            exec(compile(code, f"{path.name}[block {index}]", "exec"), namespace)
        except Exception as err:  # name the block that failed
            raise AssertionError(f"{path.name}, python block {index} failed: {err!r}\n{code}") from err


def test_tutorial_pictures_exist():
    text = (ROOT / "docs" / "tutorial.md").read_text()
    for name in re.findall(r"\(img/(tutorial_[a-z_]+\.png)\)", text):
        assert (ROOT / "docs" / "img" / name).is_file(), name
