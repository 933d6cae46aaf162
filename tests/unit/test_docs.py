"""The README and the documentation site (docs/): links that lead somewhere, figures that can be
traced to the run that measured them, and a README that stays a front door.

A figure is cited as ``[name](../benchmarks/results/name.json) (commit `abc1234`, `command`)``:
the results file, the commit the code was at when it ran and the command that ran it, both as
that file records them. A ``.md`` results file is cited the same way, with its ``.json``'s
commit and command. Reads text only: no PyTorch, no MkDocs.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"
RESULTS = REPO / "benchmarks" / "results"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
README_LIMIT = 10_240  # bytes

# [text](target) and ![alt](target), outside code
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# a link to a results file, and what follows it on the line
RESULTS_LINK = re.compile(r"(?P<image>!?)\[[^\]]*\]\((?P<target>(?:\.\./)*benchmarks/results/(?P<name>[^)\s#]+))\)(?=(?P<after>.*))")
CITATION = re.compile(r" \(commit `(?P<commit>[0-9a-f]{7,40})`, `(?P<command>[^`]+)`\)")
HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*#*\s*$", re.MULTILINE)
PROVENANCE_FIELDS = ("commit", "command", "machine", "date")


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def prose(page: Path) -> str:
    """The page without fenced code blocks (their brackets are code, not links)."""
    return FENCE.sub("", page.read_text())


def links(page: Path) -> list[str]:
    return [match["target"] for match in LINK.finditer(CODE_SPAN.sub("", prose(page)))]


def slug(title: str) -> str:
    """A heading's anchor as MkDocs (Python-Markdown's toc) makes it, and close to GitHub's."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    return {slug(match["title"]) for match in HEADING.finditer(prose(page))}


def results_json(name: str) -> Path:
    """The JSON that holds a results file's provenance: itself, or the .json beside a .md or .png."""
    return RESULTS / (Path(name).stem + ".json")


def provenance_problems(path: Path) -> list[str]:
    if not path.is_file():
        return [f"{path.name} does not exist"]
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        return [f"{path.name} is not a JSON object"]
    problems = [f"no {key!r}" for key in PROVENANCE_FIELDS if key not in data]
    if not re.fullmatch(r"[0-9a-f]{40}", str(data.get("commit", ""))):
        problems.append(f"'commit' is not a 40-hex commit: {data.get('commit')!r}")
    if not isinstance(data.get("command"), str) or not data["command"].strip():
        problems.append("'command' is not a command line")
    machine = data.get("machine")
    # Files written before runs recorded their machine were backfilled from git history, and say
    # so in 'provenance': there a value the run did not record is null ("not recorded"), never
    # guessed. A file a run writes itself must carry both.
    backfilled = "backfilled" in str(data.get("provenance", ""))
    if not isinstance(machine, dict):
        problems.append(f"'machine' is not an object with 'cpu' and 'cores': {machine!r}")
    else:
        for key, valid in (("cpu", lambda v: isinstance(v, str) and v.strip()), ("cores", lambda v: isinstance(v, int) and v > 0)):
            if key not in machine:
                problems.append(f"no 'machine.{key}'")
            elif not valid(machine[key]) and not (machine[key] is None and backfilled):
                problems.append(f"'machine.{key}' is {machine[key]!r}" + ("" if backfilled else " in a file that does not say it was backfilled"))
    if not re.match(r"\d{4}-\d{2}-\d{2}", str(data.get("date", ""))):
        problems.append(f"'date' is not a date: {data.get('date')!r}")
    return [f"{path.name}: {problem}" for problem in problems]


def results_links(page: Path) -> list[re.Match]:
    return [match for line in prose(page).splitlines() for match in RESULTS_LINK.finditer(line)]


# ---------------------------------------------------------------------------------------------


def test_readme_is_a_front_door_under_10_kb():
    size = README.stat().st_size
    assert size < README_LIMIT, f"README.md is {size:,} bytes; keep it under {README_LIMIT:,}: move detail into docs/"


def test_readme_keeps_the_two_commands():
    text = README.read_text()
    setup = (REPO / "scripts" / "setup.sh").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh && .venv/bin/patchcore train samples/battery_weld --backbone mobilenet_v2 --out runs/battery_weld" in text
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest -q" in text
    assert ".venv/bin/python -m pytest -q" in ci and "scripts/setup.sh" in ci
    assert "docs" in re.search(r'pip install -e "\.\[([^\]]*)\]"', setup)[1].split(","), "setup.sh installs the docs extra"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_lead_to_files_and_headings_that_exist(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading '#{anchor}' in {path.relative_to(REPO)}")
        elif path_part and REPO not in path.parents:
            broken.append(f"{target}: outside the repository")
    assert not broken, f"{page_id(page)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_cited_results_files_record_commit_command_machine_and_date(page):
    problems = []
    for match in results_links(page):
        problems += provenance_problems(results_json(match["name"]))
    assert not problems, f"{page_id(page)} cites results files without their provenance: " + "; ".join(sorted(set(problems)))


def expected_citation(name: str, prefix: str) -> str:
    data = json.loads(results_json(name).read_text())
    return f"[{name}]({prefix}benchmarks/results/{name}) (commit `{data['commit'][:7]}`, `{data['command']}`)"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_figures_show_the_commit_and_command_of_their_results_file(page):
    wrong = []
    for match in results_links(page):
        if match["image"] or not results_json(match["name"]).is_file():
            continue  # a plot is cited beside it; a missing file is the test above's
        data = json.loads(results_json(match["name"]).read_text())
        citation = CITATION.match(match["after"])
        prefix = match["target"][: match["target"].index("benchmarks/results/")]
        if citation is None:
            wrong.append(f"{match['name']} is not followed by ' (commit `...`, `...`)': write {expected_citation(match['name'], prefix)}")
        elif not str(data.get("commit", "")).startswith(citation["commit"]) or citation["command"] != data.get("command"):
            wrong.append(f"{match['name']} shows commit {citation['commit']} and `{citation['command']}`; the file says: {expected_citation(match['name'], prefix)}")
    assert not wrong, f"{page_id(page)}: " + "; ".join(wrong)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_plots_are_cited_beside_their_results_file(page):
    text = prose(page)
    for match in results_links(page):
        if match["image"]:
            data_file = results_json(match["name"]).name
            assert f"benchmarks/results/{data_file})" in text, f"{page_id(page)} shows {match['name']} without citing {data_file}"


def test_the_provenance_table_lists_every_cited_file_as_it_records_itself():
    """docs/benchmarks.md's table: one row per results file cited anywhere, with the date, CPU
    model and cores its JSON records."""
    table = {}
    for line in (DOCS / "benchmarks.md").read_text().splitlines():
        match = RESULTS_LINK.search(line)
        if line.startswith("| ") and match and match["name"].endswith(".json"):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            table[match["name"]] = cells
    cited = {results_json(match["name"]).name for page in PAGES for match in results_links(page)}
    assert cited <= set(table), f"cited but not in the provenance table of docs/benchmarks.md: {sorted(cited - set(table))}"
    for name, cells in table.items():
        data = json.loads((RESULTS / name).read_text())
        recorded = [data["date"], *(str(data["machine"][key] or "not recorded") for key in ("cpu", "cores"))]
        assert cells[1:4] == recorded, f"{name}: the table says {cells[1:4]}; the file says {recorded}"


def test_api_reference_pages_name_modules_that_exist():
    """Each ``::: patchcore.x.y`` of docs/api/ names a module of src/ (mkdocstrings would fail the build)."""
    missing = []
    for page in sorted((DOCS / "api").glob("*.md")):
        for module in re.findall(r"^::: ([\w.]+)", page.read_text(), re.MULTILINE):
            base = REPO / "src" / Path(*module.split("."))
            if not (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()):
                missing.append(f"{page.name}: {module}")
    assert not missing, f"API reference pages name modules that do not exist: {missing}"


def test_every_docs_page_is_in_the_site_navigation():
    config = (REPO / "mkdocs.yml").read_text()
    nav = set(re.findall(r"^\s*- (?:[^:\n]+: )?([\w/.-]+\.md)\s*$", config, re.MULTILINE))
    pages = {str(page.relative_to(DOCS)) for page in DOCS.rglob("*.md")}
    assert pages == nav, f"pages not in mkdocs.yml's nav: {sorted(pages - nav)}; nav entries with no page: {sorted(nav - pages)}"
