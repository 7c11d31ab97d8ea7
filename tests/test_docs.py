"""The documentation against the code: package maps, README length, relative links, issue numbers.

The package maps are tables whose first column names one path in backticks:

* README.md, section "## The package": every top-level module (`binarydm_jax/main.py`, ...) and
  every subpackage (`binarydm_jax/training/`, ...), nothing else;
* docs/design.md, section "## Package map" (its tables, one per package): every module of the
  package, i.e. every `.py` file under `binarydm_jax/` except the `__init__.py` files (packages are
  named by the README's map; `__main__.py` files are commands and are listed).

So adding, moving or removing a module without updating the maps fails here. Links: every relative
markdown link or image in README.md and docs/*.md must name a file that exists and, when it has a
`#fragment` into a markdown file, a heading of that file (GitHub's anchor rules).
"""

import collections
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "binarydm_jax"
README = ROOT / "README.md"
DESIGN = ROOT / "docs" / "design.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def section(path: Path, heading: str) -> str:
  """The text of `heading` (a '## ' line) up to the next '## ' heading."""
  text = path.read_text()
  assert f"\n{heading}\n" in text, f"{path.name} has no {heading!r} section"
  return text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def first_column_paths(text: str) -> list[str]:
  """The backticked path in the first cell of every table body row of `text`."""
  lines = text.splitlines()
  paths = []
  for i, line in enumerate(lines):
    if not line.startswith("|") or re.fullmatch(r"[|:\- ]+", line):
      continue
    if i + 1 < len(lines) and re.fullmatch(r"\|[|:\- ]+", lines[i + 1]):
      continue  # A header row.
    cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
    match = re.fullmatch(r"`([^`]+)`", cells[0])
    assert match, f"first cell is not one backticked path: {line!r}"
    assert len(cells) >= 2 and cells[1], f"no description: {line!r}"
    paths.append(match.group(1))
  return paths


def test_design_package_map_names_every_module_once():
  listed = first_column_paths(section(DESIGN, "## Package map"))
  duplicates = [path for path, n in collections.Counter(listed).items() if n > 1]
  assert not duplicates, f"listed twice in docs/design.md: {duplicates}"
  modules = {
    path.relative_to(ROOT).as_posix()
    for path in PACKAGE.rglob("*.py")
    if path.name != "__init__.py"
  }
  assert "binarydm_jax/training/loop.py" in modules  # The walk itself found the package.
  missing, stale = modules - set(listed), set(listed) - modules
  assert not missing and not stale, (
    f"docs/design.md's package map: add {sorted(missing)}, remove {sorted(stale)}"
  )


def test_readme_package_map_names_the_top_level_modules_and_packages():
  listed = first_column_paths(section(README, "## The package"))
  assert len(listed) == len(set(listed)), "README's package map lists a path twice"
  top_level = {
    f"binarydm_jax/{path.name}" for path in PACKAGE.glob("*.py") if path.name != "__init__.py"
  }
  packages = {f"binarydm_jax/{path.parent.name}/" for path in PACKAGE.glob("*/__init__.py")}
  assert "binarydm_jax/main.py" in top_level and "binarydm_jax/quant/" in packages
  missing, stale = (top_level | packages) - set(listed), set(listed) - (top_level | packages)
  assert not missing and not stale, (
    f"README's package map: add {sorted(missing)}, remove {sorted(stale)}"
  )


def test_readme_is_at_most_200_lines():
  lines = README.read_text().splitlines()
  assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"


def github_anchor(heading: str) -> str:
  """GitHub's id of a heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
  """The anchors of every heading of a markdown file (repeated ones numbered as GitHub does)."""
  seen = collections.Counter()
  result = set()
  for line in FENCE.sub("", path.read_text()).splitlines():
    match = re.match(r"#{1,6} (.+)", line)
    if match:
      anchor = github_anchor(match.group(1))
      result.add(anchor if not seen[anchor] else f"{anchor}-{seen[anchor]}")
      seen[anchor] += 1
  return result


def relative_links(path: Path) -> list[str]:
  """Link and image targets of a markdown file outside code, other than URLs."""
  text = INLINE_CODE.sub("", FENCE.sub("", path.read_text()))
  return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_github_anchor_follows_githubs_rules():
  assert github_anchor("Remote workdirs (`gs://`)") == "remote-workdirs-gs"
  assert github_anchor("Outputs (in `--workdir`)") == "outputs-in---workdir"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_relative_links_point_to_files_and_headings_that_exist(doc):
  broken = []
  for target in relative_links(doc):
    file_part, _, fragment = target.partition("#")
    linked = (doc.parent / file_part).resolve() if file_part else doc
    if not linked.exists():
      broken.append(f"{target} (no such file)")
    elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
      broken.append(f"{target} (no such heading in {linked.name})")
  assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"


def test_readme_links_every_guide_and_the_module_map():
  links = relative_links(README)
  guides = {path.name for path in DOCS if path.parent.name == "docs"}
  linked = {Path(target.partition("#")[0]).name for target in links}
  assert guides <= linked, f"README's map of the guides misses {sorted(guides - linked)}"
  assert "docs/design.md#package-map" in links
  assert "BENCHMARKS.md" in links


@pytest.mark.parametrize("doc", [*DOCS, ROOT / "BENCHMARKS.md"], ids=lambda path: path.name)
def test_no_issue_numbers(doc):
  """The docs name measurements, not the tracker's issue numbers ("issue 14", "Issue 5")."""
  hits = re.findall(r".{0,30}\b[Ii]ssues?\s*#?\d+.{0,30}", doc.read_text())
  assert not hits, f"{doc.name} names issue numbers: {hits}"
