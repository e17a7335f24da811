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


def _cli_commands() -> list[tuple[str, str]]:
    """``(file, command)`` for every ``gnn-transformer`` command the README and docs show: lines of
    code blocks (continuations joined) and inline code spans (which may wrap). Usage synopses (with
    ``[optional]`` parts or ``...``) are not commands."""
    found = []
    for path in FILES:
        text = path.read_text()
        spans = [" ".join(s.split()) for s in re.findall(r"(?<!`)`([^`]+)`(?!`)", BLOCK.sub("", text))]
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", re.sub(r"\\\n\s*", " ", text), re.S | re.M):
            spans += [line.strip().removeprefix("$ ") for line in block.splitlines()]
        for span in spans:
            if span.startswith("gnn-transformer ") and "[" not in span and "..." not in span:
                found.append((path.name, span.split(" #")[0].split(" | ")[0].split(" && ")[0].split(" > ")[0]))
    return sorted(set(found))


def test_docs_show_cli_commands():
    commands = _cli_commands()
    assert len(commands) >= 40
    assert {name for name, _ in commands} >= {"README.md", "cli.md", "workloads.md", "viewer.md"}


@pytest.mark.parametrize("name,command", _cli_commands(), ids=lambda x: x if isinstance(x, str) else None)
def test_every_cli_command_in_the_docs_parses(name, command, capsys):
    """A renamed or removed option, or a value out of its choices, fails here, not for a reader. A
    bare ``gnn-transformer <command>`` is a name in the text: its command must exist."""
    import shlex

    from gnn_transformer.cli import build_parser

    words = shlex.split(command)[1:]
    if len(words) == 1:
        words.append("--help")  # a name: only the command is checked
    try:
        build_parser().parse_args(words)
    except SystemExit as exit:  # --help exits 0; an unknown option or a bad value exits 2
        assert exit.code == 0, f"{name}: {command}: {capsys.readouterr().err}"


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name) for p in FILES if p.exists()])
def test_relative_links_resolve(path):
    """Every relative markdown link (``[text](file#anchor)``) names a file of the repository."""
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        file = target.split("#")[0]
        if file and not target.startswith(("http://", "https://", "mailto:")):
            assert (path.parent / file).exists(), f"{path.name}: {target}"


def _table_rows(section: str) -> list[dict]:
    """The rows of the markdown tables in ``section`` whose header starts like the first table's,
    as dicts keyed by its column names; ``n`` and ``edges`` as integers, ``ms`` and ``peak_mb`` as
    numbers (``None`` for a dash), the rest as text."""
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != len(header) or cells[0] == header[0] or set(cells[0]) <= {"-"}:
            continue
        row = dict(zip(header, cells))
        for key in ("n", "edges"):
            if key in row:
                row[key] = int(row[key])
        for key in ("ms", "peak_mb"):
            if key in row:
                row[key] = None if row[key] in ("—", "-") else float(row[key])
        rows.append(row)
    return rows


def test_benchmarks_ratios_are_the_rows_ratios():
    """The "Against the baselines" table of docs/benchmarks.md is what ``against_baselines`` makes of
    the CPU rows above it: no ratio is worked out by hand."""
    from gnn_transformer.bench.benchmark import AGAINST_COLUMNS, against_baselines, format_markdown

    text = (ROOT / "docs" / "benchmarks.md").read_text()
    section = text[text.index("## CPU (float32)") : text.index("### Against the baselines of this run")]
    rows = _table_rows(section)
    for row in rows:  # a flex row's note names the variant that won
        row["variant"] = row["note"].split(" fastest")[0] if " fastest" in row["note"] else None
    assert len(rows) == 30
    assert format_markdown(against_baselines(rows), AGAINST_COLUMNS) in text


def test_benchmarks_selection_ratios_are_the_rows_ratios():
    """The same for the selection section: its ratio table is ``selection.against_baselines`` of its rows."""
    from gnn_transformer.bench.selection import AGAINST_COLUMNS, against_baselines, format_markdown

    text = (ROOT / "docs" / "benchmarks.md").read_text()
    section = text[text.index("## Graphs chosen from the data") :]
    section = section[: section.index("`auto` against each baseline")]
    rows = _table_rows(section)
    assert len(rows) == 11
    assert format_markdown(against_baselines(rows), AGAINST_COLUMNS) in text
