"""The README and docs/ against the repository: the README stays short and keeps the two set-up
commands CI and users copy; every relative link points to a file (and heading) that exists;
every command shown names a script that exists and only flags its ``--help`` lists."""

import contextlib
import functools
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 300
SETUP_COMMANDS = (
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python scripts/sample.py",
    'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && '
    ".venv/bin/python -m pytest -q -n 2",
)
# How to ask each console script for its flags (the scripts/ wrapper is the same program).
CONSOLE_SCRIPTS = {
    "grok-sample": ["scripts/sample.py"],
    "grok-plan": ["scripts/plan.py"],
    "grok-convert": ["scripts/convert.py"],
    "grok-train": ["scripts/train.py"],
    "grok-train-tokenizer": ["scripts/train_tokenizer.py"],
    "grok-serve": ["-m", "grok.serve"],
}
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\s*$")
INLINE_CODE = re.compile(r"`([^`]+)`")
# Words about how the pages were written rather than about the library.
FORBIDDEN = re.compile(r"\b(sessions?|lent)\b", re.IGNORECASE)


def prose_and_blocks(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The lines outside fenced code blocks, and each block as (language, lines)."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        fence = FENCE.match(line)
        if fence and block is None:
            block = (fence.group(1), [])
        elif line.startswith("```") and block is not None:
            blocks.append(block)
            block = None
        elif block is not None:
            block[1].append(line)
        else:
            prose.append(line)
    assert block is None, "a code block is not closed"
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = prose_and_blocks(page.read_text(encoding="utf-8"))
    return {slug(line.lstrip("#")) for line in prose if re.match(r"#{1,6} ", line)}


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES})"


def test_readme_keeps_the_setup_commands():
    _, blocks = prose_and_blocks(README.read_text(encoding="utf-8"))
    shown = {line.strip() for lang, lines in blocks if lang == "bash" for line in lines}
    for command in SETUP_COMMANDS:
        assert command in shown, f"README.md lost the set-up command {command!r}"


def test_slug_follows_github():
    assert slug("How the bytes travel") == "how-the-bytes-travel"
    assert slug("`scripts/device_check.py`") == "scriptsdevice_checkpy"
    assert slug("Serving: `grok-serve`") == "serving-grok-serve"


def relative_links() -> list[tuple[Path, str]]:
    found = []
    for page in PAGES:
        prose, _ = prose_and_blocks(page.read_text(encoding="utf-8"))
        for line in prose:
            for target in LINK.findall(line):
                if not re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not checked
                    found.append((page, target))
    return found


def test_pages_have_links():
    assert len(relative_links()) > len(PAGES), "the link pattern finds nothing"


@pytest.mark.parametrize(
    ("page", "target"),
    relative_links(),
    ids=lambda v: v.name if isinstance(v, Path) else v,
)
def test_relative_link_resolves(page, target):
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    assert file.exists(), f"{page.relative_to(ROOT)}: link to {target!r}: no such file"
    assert file.is_relative_to(ROOT), f"{page.relative_to(ROOT)}: {target!r} leaves the repository"
    if anchor:
        assert file.suffix == ".md", f"{page.relative_to(ROOT)}: anchor into a non-page {target!r}"
        assert anchor in anchors(file), (
            f"{page.relative_to(ROOT)}: link to {target!r}: {file.name} has no heading "
            f"with that anchor"
        )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_speak_of_the_library_only(page):
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        word = FORBIDDEN.search(line)
        assert word is None, f"{page.name}:{number}: {word.group(0)!r} in {line.strip()!r}"


# Commands shown in the pages.


def shell_commands(text: str) -> list[list[str]]:
    """Each simple command of the pages' bash blocks (continuations joined, comments and
    ``&&`` chains split), plus inline code that is a whole grok command."""
    _, blocks = prose_and_blocks(text)
    lines = []
    for lang, block in blocks:
        if lang == "bash":
            lines += "\n".join(block).replace("\\\n", " ").splitlines()
    prose, _ = prose_and_blocks(text)
    for line in prose:
        lines += [
            code
            for code in INLINE_CODE.findall(line)
            if re.match(r"(grok-[a-z-]+|python (scripts/|-m pytest))( |$)", code)
        ]
    commands = []
    for line in lines:
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1 :]
    return [c for c in commands if c]


def program_of(words: list[str]) -> tuple[list[str] | None, list[str]]:
    """(how to run the program for ``--help``, its arguments), or (None, ...) for a command
    that is not one of ours (pip, curl, venv)."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # PYTHONPATH=. and the like
        words = words[1:]
    if not words:
        return None, []
    if words[0] in CONSOLE_SCRIPTS:
        return CONSOLE_SCRIPTS[words[0]], words[1:]
    if words[0].endswith(("python", "python3")) and len(words) > 1:
        if words[1].startswith("scripts/"):
            return [words[1]], words[2:]
        if words[1:3] == ["-m", "pytest"]:
            return ["-m", "pytest"], words[3:]
    return None, words


def all_commands() -> list[tuple[str, list[str], list[str]]]:
    found = []
    for page in PAGES:
        for words in shell_commands(page.read_text(encoding="utf-8")):
            program, args = program_of(words)
            if program is not None:
                found.append((page.name, program, args))
    return found


def test_shell_commands_are_found():
    commands = shell_commands("```bash\nPYTHONPATH=. python scripts/x.py --a \\\n  --b  # c\n```")
    assert commands == [["PYTHONPATH=.", "python", "scripts/x.py", "--a", "--b"]]
    assert program_of(commands[0]) == (["scripts/x.py"], ["--a", "--b"])
    assert len(all_commands()) > 10, "the pages' commands went missing"


@functools.cache
def help_text(program: tuple[str, ...]) -> str:
    """What ``program --help`` prints, run in this process as ``python`` would run it
    (``runpy``: the script, or the module as ``__main__``), without a new interpreter's start
    for each program."""
    out, argv = io.StringIO(), sys.argv
    sys.argv = [program[-1], "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
            if program[0] == "-m":
                runpy.run_module(program[1], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(ROOT / program[0]), run_name="__main__")
    finally:
        sys.argv = argv
    assert done.value.code in (0, None), f"{' '.join(program)} --help exited {done.value.code}"
    return out.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("page", "program", "args"),
    all_commands(),
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_command_exists_with_its_flags(page, program, args):
    if program[0] == "-m" and program[1] == "pytest":
        for arg in args:
            if arg.startswith("tests/"):
                test_file = arg.split("::")[0]
                assert (ROOT / test_file).is_file(), f"{page}: no test file {test_file}"
        return
    if program[0].startswith("scripts/"):
        assert (ROOT / program[0]).is_file(), f"{page}: no script {program[0]}"
    text = help_text(tuple(program))
    for arg in args:
        if arg.startswith("--"):
            flag = arg.split("=")[0]
            listed = re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)
            assert listed, f"{page}: {' '.join(program)} has no flag {flag}"
