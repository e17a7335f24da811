"""The scripts that draw the docs' pictures (``docs/make_*.py``) run and write a PNG for every
picture of theirs that the docs show, so the pictures can always be made again from the code."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
SHOWN = {name for md in DOCS.glob("*.md") for name in re.findall(r"\(img/([\w.-]+\.png)\)", md.read_text())}


@pytest.mark.parametrize("script", ["make_figures", "make_tutorial_figures", "make_analysis_figures"])
def test_figure_script_draws_the_pictures_the_docs_show(script, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(script, DOCS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT", tmp_path)
    written = module.main()
    assert written and all(p.parent == tmp_path and p.stat().st_size > 1000 for p in written)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
    names = {p.name for p in written}
    assert names <= {p.name for p in (DOCS / "img").iterdir()}  # each has its committed copy
    mine = {n for n in SHOWN if (DOCS / "img" / n).exists() and n.split("_")[0] in {m.split("_")[0] for m in names}}
    assert mine <= names, sorted(mine - names)
