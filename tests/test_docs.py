"""The README and docs/ cannot drift from the code.

- every relative link (and every `docs/…`, `benchmarks/…`, `examples/…` path quoted in code) of
  the README and docs/*.md points to a file inside the repository, and every `#anchor` to a heading;
- every package path quoted in code (`graph/select.py`, `vcon_fx/io/atomic.py`) is a file of
  vcon_fx/, every `register_*` decorator named exists, and every `vcon_fx.x.y` name imports;
- docs/architecture.md names every file of each folder of vcon_fx/, and no file that is not there;
- docs/extending.md's worked examples import only names the package has, and the files they
  tell you to add do not exist yet;
- no page cites a file outside the repository (`../shared`, absolute paths);
- every `vcon-fx SUB` shown is a sub-command of `vcon_fx.cli.build_parser()`;
- docs/cli.md documents exactly the flags each command's parser has, and every choice of a flag;
- docs/cli.md's exit-code table lists exactly the codes of `vcon_fx/errors.py` (plus 0 and 130);
- docs/zoo.md is what `benchmarks/zoo_table.py --docs` writes from the results JSON;
- the README keeps `make demo` / `make test` as a newcomer's set-up, and its methods table
  names registered methods.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

import vcon_fx.errors
from vcon_fx import registered_methods
from vcon_fx.cli import build_parser
from vcon_fx.cli.main import INTERRUPTED

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
CLI_PAGE = DOCS / "cli.md"

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
SUBCOMMAND = re.compile(r"(?<![\w-])vcon-fx\s+([a-z][\w-]*)")
# A path quoted from the repository root; one with a placeholder (`tests/test_<name>.py`) is not matched.
REPO_PATH = re.compile(r"(?<![\w./-])((?:docs|benchmarks|examples|tests|vcon_fx)/[\w./-]*)(?![<\w./-])")
OUTSIDE = re.compile(r"\.\./shared|(?<![\w.~-])(?:/(?:work|tmp|home|root|usr|etc|mnt|opt|var|Users)/|~/)|file://")
PACKAGE = ROOT / "vcon_fx"
# A module path under vcon_fx/, quoted with or without the `vcon_fx/` prefix (`graph/select.py`).
PACKAGE_PATH = re.compile(r"(?<![\w./<-])(?:vcon_fx/)?((?:%s)/[\w/]*\.py)(?![\w./-])"
                          % "|".join(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()))
REGISTER = re.compile(r"\b(register_\w+)")
DOTTED = re.compile(r"\bvcon_fx(?:\.[A-Za-z_]\w*)+")
EXTENDING = DOCS / "extending.md"
ARCHITECTURE = DOCS / "architecture.md"
# The files docs/extending.md's worked examples tell you to add: they must not exist (yet).
NEW_FILES = {"methods/pow2.py", "schedules/sqrt.py", "data/svmlight.py", "export/kernels/conv_integer.py",
             "sources/hfconfig.py", "tests/methods/test_pow2.py"}


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _code(text: str) -> list[str]:
    """Inline code spans and fenced blocks: where commands and paths are shown."""
    return CODE_SPAN.findall(FENCE.sub("", text)) + FENCE.findall(text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces → hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+\s+(.*)$", FENCE.sub("", _text(page)), re.M)}


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ── links and paths ─────────────────────────────────────────────────────────────────────────


def test_docs_folder_has_the_pages_the_readme_promises():
    for name in ("cli", "methods", "capture", "performance", "zoo", "architecture", "extending"):
        assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_point_into_the_repository(page):
    bad = []
    for target in LINK.findall(FENCE.sub("", _text(page))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if ROOT not in file.parents and file != ROOT:
            bad.append(f"{target} (outside the repository)")
        elif not file.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            bad.append(f"{target} (no heading #{anchor} in {_rel(file)})")
    assert not bad, f"{_rel(page)}: broken links: {bad}"


def _new_files(page: Path) -> set[str]:
    return NEW_FILES if page == EXTENDING else set()


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_quoted_repository_paths_exist(page):
    missing = sorted({p for span in _code(_text(page)) for p in REPO_PATH.findall(span)
                      if "*" not in p and not (ROOT / p).exists()} - _new_files(page))
    assert not missing, f"{_rel(page)} quotes files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_quoted_package_paths_exist(page):
    missing = sorted({p for span in _code(_text(page)) for p in PACKAGE_PATH.findall(span)
                      if not (PACKAGE / p).is_file()} - _new_files(page))
    assert not missing, f"{_rel(page)} quotes modules that vcon_fx/ does not have: {missing}"


def test_the_files_extending_md_adds_do_not_exist_yet():
    shown = {p for span in _code(_text(EXTENDING)) for p in PACKAGE_PATH.findall(span) + REPO_PATH.findall(span)}
    assert NEW_FILES <= shown, f"docs/extending.md no longer adds {sorted(NEW_FILES - shown)}: update NEW_FILES"
    clash = sorted(p for p in NEW_FILES if (PACKAGE / p).exists() or (ROOT / p).exists())
    assert not clash, f"docs/extending.md's examples would add files that exist now: {clash}; pick other examples"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_registries_and_python_names_exist(page):
    source = "\n".join(p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py"))
    text = "\n".join(_code(_text(page)))
    unknown = sorted({n for n in REGISTER.findall(text) if not re.search(rf"^def {n}\(", source, re.M)})
    assert not unknown, f"{_rel(page)} names registry decorators vcon_fx/ does not define: {unknown}"
    broken = sorted(d for d in set(DOTTED.findall(_text(page))) if not _resolves(d))
    assert not broken, f"{_rel(page)} names Python objects that do not exist: {broken}"


def _resolves(dotted: str) -> bool:
    """Whether `vcon_fx.a.b.c` is a module, or an attribute of the longest module prefix (imports it)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for attr in parts[end:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _folder_sections() -> dict[str, str]:
    """Folder ("graph", or "errors.py") → its part of architecture.md's "The folders" section."""
    body = _sections(_text(ARCHITECTURE), "##")["The folders"]
    parts = re.split(r"^\*\*`([\w.]+)/?`\*\*", body, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_architecture_names_every_file_of_every_folder():
    sections = _folder_sections()
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert set(sections) == folders | {"errors.py"}, f"architecture.md's folders: {sorted(sections)}, vcon_fx/: {sorted(folders)}"
    for folder, body in sections.items():
        if folder.endswith(".py"):
            assert (PACKAGE / folder).is_file()
            continue
        named = {span for span in CODE_SPAN.findall(body) if span.endswith(".py")}
        files = {p.name for p in (PACKAGE / folder).rglob("*.py") if p.name != "__init__.py"}
        assert named == files, (f"architecture.md's {folder}/ lacks {sorted(files - named)} and names "
                                f"{sorted(named - files)}, which vcon_fx/{folder}/ does not have")


def _example_blocks() -> list[tuple[str, str]]:
    """(the file extending.md says to add, its code) for each worked example."""
    text = _text(EXTENDING)
    found = []
    for block in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        before = re.findall(r"file, `([\w/]+\.py)`", text[:block.start()])
        found.append((before[-1], block.group(1)))
    return found


@pytest.mark.parametrize("path,code", _example_blocks(), ids=[p for p, _ in _example_blocks()])
def test_extending_examples_import_only_what_the_package_has(path, code):
    package = "vcon_fx." + str(Path(path).parent).replace("/", ".")
    missing = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.level:
            module = importlib.import_module("." * node.level + (node.module or ""), package)
            missing += [f"{module.__name__}.{a.name}" for a in node.names if not hasattr(module, a.name)
                        and not importlib.util.find_spec(f"{module.__name__}.{a.name}")]
    assert not missing, f"docs/extending.md's {path} imports names the package lacks: {missing}"


def test_readme_links_to_docs_and_benchmarks():
    targets = LINK.findall(_text(README))
    assert any(t.startswith("docs/") for t in targets) and any(t.startswith("benchmarks/") for t in targets)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_no_file_outside_the_repository_is_cited(page):
    hits = sorted({m.group(0) for m in OUTSIDE.finditer(_text(page))})
    assert not hits, f"{_rel(page)} cites files outside the repository: {hits}"


# ── the command line ────────────────────────────────────────────────────────────────────────


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every option string of a parser (not -h/--help, not the sub-command slot)."""
    return {s: a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
            for s in a.option_strings}


def _sections(text: str, level: str) -> dict[str, str]:
    """Heading text → body up to the next heading of the same or a higher level."""
    parts = re.split(rf"^({level} .*)$", FENCE.sub("", text), flags=re.M)
    out = {}
    for heading, body in zip(parts[1::2], parts[2::2]):
        out[heading.lstrip("#").strip()] = re.split(r"^#{1,%d} " % len(level), body, flags=re.M)[0]
    return out


def _table_rows(body: str) -> list[str]:
    return [line for line in body.splitlines() if line.startswith("|") and not re.match(r"\|[\s|:-]*$", line)]


def _flags_in_tables(body: str) -> dict[str, str]:
    """Flag → its table row, from the first cell of each row."""
    return {flag: row for row in _table_rows(body) for flag in FLAG.findall(row.split("|")[1])}


def _documented_commands() -> dict[str, dict[str, str]]:
    """Command ("" for the top level) → documented flag → row, shared groups included by link."""
    text = _text(CLI_PAGE)
    shared = {_slug(h): _flags_in_tables(b) for h, b in _sections(text, "###").items() if h.endswith("flags")}
    out = {}
    for heading, body in _sections(text, "##").items():
        m = re.fullmatch(r"`vcon-fx(?: (\w+))?`", heading)
        if not m:
            continue
        flags = _flags_in_tables(body.split("\n### ")[0])
        for anchor in re.findall(r"\]\(#([\w-]+)\)", body):
            flags.update(shared.get(anchor, {}))
        out[m.group(1) or ""] = flags
    return out


def test_every_command_has_a_section_in_cli_md():
    documented = _documented_commands()
    assert set(documented) == {""} | set(_subparsers(build_parser()))


def test_every_subcommand_shown_exists():
    commands = set(_subparsers(build_parser()))
    for page in PAGES:
        shown = {c for block in _code(_text(page)) for c in SUBCOMMAND.findall(block)}
        assert shown <= commands, f"{_rel(page)} shows unknown sub-command(s) {sorted(shown - commands)}"


@pytest.mark.parametrize("command", ["", *sorted(_subparsers(build_parser()))])
def test_cli_md_documents_exactly_the_parsers_flags(command):
    parser = build_parser()
    parser = _subparsers(parser)[command] if command else parser
    in_parser = _options(parser)
    documented = _documented_commands()[command]
    name = f"vcon-fx {command}".strip()
    assert not set(in_parser) - set(documented), f"docs/cli.md does not document {name} {sorted(set(in_parser) - set(documented))}"
    assert not set(documented) - set(in_parser), f"docs/cli.md documents {name} {sorted(set(documented) - set(in_parser))}, which the parser lacks"
    for flag, action in in_parser.items():
        missing = [c for c in action.choices or () if not re.search(rf"(?<![\w-]){re.escape(str(c))}(?![\w-])", documented[flag])]
        assert not missing, f"docs/cli.md: {name} {flag} does not mention the choice(s) {missing}"


def test_exit_code_table_matches_the_error_classes():
    body = _sections(_text(CLI_PAGE), "##")["Exit codes"]
    documented = {int(row.split("|")[1]) for row in _table_rows(body)[1:]}
    raised = {cls.exit_code for _, cls in inspect.getmembers(vcon_fx.errors, inspect.isclass)
              if issubclass(cls, vcon_fx.errors.VconError)}
    assert documented == raised | {0, INTERRUPTED}, f"exit codes: documented {sorted(documented)}, errors.py {sorted(raised)}"


# ── the README ──────────────────────────────────────────────────────────────────────────────


def test_readme_keeps_the_newcomer_setup_lines():
    text = _text(README)
    assert "make demo    # creates .venv, installs, runs the whole pipeline on real handwritten digits" in text
    assert "make test    # installs what the tests need and runs them (CPU, a few minutes)" in text


def test_readme_is_short():
    assert len(_text(README).splitlines()) <= 130, "the README is read in five minutes: move details to docs/"


def test_readme_methods_table_names_registered_methods():
    body = _sections(_text(README), "##")["Methods"]
    names = {re.sub(r"`([\w+]+).*", r"\1", row.split("|")[1].strip()) for row in _table_rows(body)[1:]}
    known = set(registered_methods())
    unknown = sorted(n for n in names if not set(n.split("+")) <= known)
    assert names and not unknown, f"README methods table names unregistered methods {unknown}"


# ── generated pages ─────────────────────────────────────────────────────────────────────────


def test_zoo_page_is_generated_from_the_results():
    spec = importlib.util.spec_from_file_location("zoo_table", ROOT / "benchmarks" / "zoo_table.py")
    zoo_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo_table)
    expected = zoo_table.docs_page(zoo_table.load_results())
    assert _text(DOCS / "zoo.md") == expected, "docs/zoo.md is stale: run `python benchmarks/zoo_table.py --docs`"
