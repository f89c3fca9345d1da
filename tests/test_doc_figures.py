"""Every measured figure in README.md and docs/ comes from a committed result file (issue 27).

A block of a page (a paragraph, a list or a table: lines up to the next blank line, outside code
fences) that states measured figures ends with a citation on its own line:

    <!-- figures: benchmarks/results/training_step_cpu.json, benchmarks/results/cpu-amd-epyc.json -->

Each figure of a cited block must be in one of the cited files, to the precision it is printed
with: 0.82 matches any value in [0.815, 0.825], also a fraction printed as a percentage (95.3 from
0.9534). A figure is a number, except those that name rather than measure: integers below 10
(counts and settings: "3 seeds", "k = 5"), dates, versions, numbers inside `code` or links, and parts
of identifiers (sm_90, efficientnet_b0, arXiv 2212.07158). A citation that is not a path in the
repository (``arXiv:...``, ``https://...``) names an outside source and is not looked up.

A block that states a measurement (a number with a unit: %, s, min, x, MiB, GB, points, images/s,
registers, tests passed) must carry a citation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, List, NamedTuple, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

CITATION = re.compile(r"^<!-- figures: (?P<sources>.+?) -->\s*$")
OUTSIDE = ("arXiv:", "http://", "https://")
MEASUREMENT = re.compile(
    r"\d(?:\.\d+)?x\b|\d(?:\.\d+)?\s?(?:%|s\b|ms\b|min\b|h\b|MiB\b|GiB\b|KiB\b|GB\b|MB\b|points?\b|images/s|"
    r"views/s|registers\b|passed\b|skipped\b)")
# removed before figures are read: code, links' targets, HTML comments, dates, versions, identifiers
NOT_FIGURES = [  # (images and code come first: a measurement's unit inside them is not a measurement)
    re.compile(r"!\[[^\]]*\]\([^)]*\)"), re.compile(r"`[^`]*`"), re.compile(r"\]\([^)]*\)"), re.compile(r"<!--.*?-->"),
    re.compile(r"\b\d{4}-\d{2}-\d{2}\b"), re.compile(r"\b\d+\.\d+\.\d+\b"),
    re.compile(r"arXiv \d+\.\d+"), re.compile(r"\b\w*[A-Za-z_]\w*\d\w*\b|\b\d+[A-Za-z_]\w*[A-Za-z_]\w*\b"),
]
NUMBER = re.compile(r"(?<![\w.])[-+±]?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\w])|(?<![\w.,])[-+±]?\d+(?:\.\d+)?(?![\w.]\d)")


class Block(NamedTuple):
    page: Path
    line: int
    text: str
    sources: List[str]


def blocks(page: Path) -> Iterator[Block]:
    """The page's blocks outside code fences, each with the sources its citation names."""
    lines, fenced, start, current = page.read_text().splitlines(), False, 0, []
    for number, line in enumerate(lines + [""], 1):
        if line.startswith("```"):
            fenced = not fenced
            current = []
            continue
        if fenced:
            continue
        cited = CITATION.match(line)
        if line.strip() and not cited:
            if not current:
                start = number
            current.append(line)
            continue
        if current:
            sources = [s.strip() for s in cited.group("sources").split(",")] if cited else []
            yield Block(page, start, "\n".join(current), sources)
        current = []


def _without(patterns, text: str) -> str:
    for pattern in patterns:
        text = pattern.sub(" ", text)
    return text


def figures(text: str) -> List[str]:
    text = _without(NOT_FIGURES, text)
    text = re.sub(r"(\d)\s?[-–]\s?(?=[+-]?\d)", r"\1 ", text)  # ranges: 0.82-1.02 is two figures
    found = []
    for token in NUMBER.findall(text):
        token = token.replace(",", "").replace("±", "")
        value = float(token)
        if "." not in token and abs(value) < 10:
            continue
        found.append(token)
    return found


def file_numbers(path: Path) -> Set[float]:
    """Every number a result file holds: JSON values (and numbers in its strings), or the numbers of
    a text file."""
    text = path.read_text()
    values: Set[float] = set()

    def walk(node) -> None:
        if isinstance(node, bool):
            return
        if isinstance(node, (int, float)):
            values.add(float(node))
        elif isinstance(node, str):
            values.update(float(t.replace(",", "")) for t in re.findall(r"-?\d[\d,]*(?:\.\d+)?", node))
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(key)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    if path.suffix == ".json":
        walk(json.loads(text))
    else:
        walk(text)
    return values


def printed_from(token: str, values: Set[float]) -> bool:
    """Is the printed figure one of the values, rounded as it is printed (or as a percentage)?"""
    figure = float(token)
    decimals = len(token.split(".")[1]) if "." in token else 0
    half = 0.5 * 10 ** -decimals + 1e-9
    signed = token.startswith(("+", "-"))
    for value in values:
        for scaled in (value, 100 * value):
            if abs(scaled - figure) <= half or (not signed and abs(abs(scaled) - figure) <= half):
                return True
    return False


def cited_blocks():
    return [b for page in PAGES for b in blocks(page) if b.sources]


def _name(block: Block) -> str:
    return f"{block.page.relative_to(ROOT)}:{block.line}"


@pytest.mark.parametrize("block", cited_blocks(), ids=_name)
def test_every_cited_figure_is_in_its_result_files(block):
    local = [s for s in block.sources if not s.startswith(OUTSIDE)]
    for source in local:
        assert (ROOT / source).is_file(), f"{_name(block)} cites {source}, which is not a committed file"
    if not local:
        return
    values = set().union(*(file_numbers(ROOT / s) for s in local))
    missing = [f for f in figures(block.text) if not printed_from(f, values)]
    first = block.text.splitlines()[0][:100]
    assert not missing, (f"{_name(block)} ('{first}...'): the figures {missing} are not in "
                         f"{', '.join(local)} to their printed precision")


def test_every_measurement_is_cited():
    uncited = [f"{_name(b)}: {b.text.splitlines()[0][:100]}" for page in PAGES for b in blocks(page)
               if not b.sources and MEASUREMENT.search(_without(NOT_FIGURES[:3], b.text))]
    assert not uncited, "blocks with measured figures and no <!-- figures: FILE --> citation:\n" + "\n".join(uncited)


def test_the_checker_fails_on_a_planted_wrong_figure(tmp_path):
    """A figure one unit off its file's value in the last printed digit is refused; the right one passes."""
    result = tmp_path / "r.json"
    result.write_text(json.dumps({"knn": 0.9534, "ratio": [0.8213, 1.0249], "seconds": 243.4}))
    values = file_numbers(result)
    page = tmp_path / "page.md"
    page.write_text("kNN 95.3 %, 0.82-1.02x, 243 s.\n<!-- figures: r.json -->\n\nkNN 95.4 %.\n")
    right, wrong = list(blocks(page))
    assert right.sources == ["r.json"] and wrong.sources == []
    assert all(printed_from(f, values) for f in figures(right.text)) and figures(right.text) == ["95.3", "0.82", "1.02",
                                                                                                   "243"]
    assert not printed_from("95.4", values) and not printed_from("0.83", values) and not printed_from("244", values)
