"""The documents and `results/` agree (no torch, no model: a second at most).

Every `results/...` path that README.md, BENCHMARKS.md or docs/*.md cite exists, and every file in `results/` is cited
by one of them. A path written with alternatives stands for each: `results/a_{x,y}.json` for a_x.json and a_y.json,
`results/a[_b].json` for a.json and a_b.json. A paragraph or list item that says "not yet regenerated on world v4"
names the command that would write a file for a figure the documents dropped: that file must not be there (a stale
one would be read as today's figure), and once it is regenerated a document cites it as a figure of its own.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
PENDING = "not yet regenerated on world v4"
CITED = re.compile(r"results/((?:[\w.\-\[\]]|\{[\w.,\-]*\})+)")
README_MAX, BENCHMARKS_MAX, DOC_PAGE_MAX = 260, 520, 90


def documents() -> list[Path]:
    return [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def expand(path: str) -> list[str]:
    """`a_{x,y}` -> a_x, a_y; `a[_b]` -> a, a_b (nested and repeated forms too)."""
    brace = re.search(r"\{([^{}]*)\}", path)
    if brace:
        return [p for alt in brace.group(1).split(",")
                for p in expand(path[:brace.start()] + alt + path[brace.end():])]
    bracket = re.search(r"\[([^\[\]]*)\]", path)
    if bracket:
        head, tail = path[:bracket.start()], path[bracket.end():]
        return expand(head + tail) + expand(head + bracket.group(1) + tail)
    return [path]


def blocks(text: str) -> list[str]:
    """Paragraphs and list items: where a 'not yet regenerated' note begins and ends."""
    out, current = [], []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("- ", "* ")):
            if current:
                out.append("\n".join(current))
            current = [line] if line.strip() else []
        else:
            current.append(line)
    if current:
        out.append("\n".join(current))
    return out


def citations() -> dict[str, list[tuple[str, bool]]]:
    """results/ file name -> [(document, pending)] for every citation."""
    cited: dict[str, list[tuple[str, bool]]] = {}
    for doc in documents():
        for block in blocks(doc.read_text()):
            pending = PENDING in block
            for match in CITED.finditer(block):
                for name in expand(match.group(1).rstrip(".")):
                    cited.setdefault(name, []).append((doc.relative_to(ROOT).as_posix(), pending))
    return cited


def result_files() -> set[str]:
    return {p.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


def test_alternatives_in_a_cited_path_expand_to_each_file():
    assert expand("a_{x,y}.json") == ["a_x.json", "a_y.json"]
    assert expand("a[_b].json") == ["a.json", "a_b.json"]
    assert sorted(expand("a_{x,y}[_k].{json,md}")) == ["a_x.json", "a_x.md", "a_x_k.json", "a_x_k.md",
                                                         "a_y.json", "a_y.md", "a_y_k.json", "a_y_k.md"]
    assert [m.group(1) for m in CITED.finditer("see `results/x_v4.md`, and results/y.{json,md}.")] == \
        ["x_v4.md", "y.{json,md}."]


def test_every_cited_results_file_exists():
    missing = {name: docs for name, docs in citations().items()
               if not all(pending for _, pending in docs) and not (RESULTS / name).is_file()}
    assert not missing, f"cited but not in results/: {missing}"


def test_every_results_file_is_cited():
    cited = {name for name, docs in citations().items() if not all(pending for _, pending in docs)}
    uncited = sorted(result_files() - cited)
    assert not uncited, f"in results/ but cited by no document (README.md, BENCHMARKS.md, docs/*.md): {uncited}"


def test_files_of_figures_not_yet_regenerated_are_absent():
    pending = {name for name, docs in citations().items() if all(p for _, p in docs)}
    stale = sorted(name for name in pending if (RESULTS / name).exists())
    assert not stale, f"named only as 'not yet regenerated on world v4', yet present in results/: {stale}"


def test_the_documents_stay_short():
    lengths = {doc.relative_to(ROOT).as_posix(): len(doc.read_text().splitlines()) for doc in documents()}
    assert lengths["README.md"] <= README_MAX, lengths
    assert lengths["BENCHMARKS.md"] <= BENCHMARKS_MAX, lengths
    long_pages = {k: v for k, v in lengths.items() if k.startswith("docs/") and v > DOC_PAGE_MAX}
    assert not long_pages, f"docs pages over {DOC_PAGE_MAX} lines: {long_pages}"


def test_no_probe_scripts_in_the_repository():
    probes = ROOT / "scripts" / "probes"
    leftovers = sorted(p.relative_to(ROOT).as_posix() for p in probes.rglob("*") if p.is_file()) \
        if probes.exists() else []
    assert not leftovers, f"files under scripts/probes/: {leftovers}"
