"""Every snippet of README.md runs as written.

* every ```python block runs in a fresh interpreter (one namespace per block) with the repository root as cwd;
* every command in a ```bash block that starts with `.venv/bin/biaslab` runs with that prefix mapped to this
  interpreter's environment; its exit status must be the one its comment names ("exit 1"), else 0;
* every command in a ```bash block is written with the `.venv/bin/` prefix (or is a `make` target);
* a line (or, in a python block, any line of the block) ending in `# not run by the tests: <reason>` is skipped:
  GPU-only, torchrun-only or minutes-long commands carry that mark.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
SKIP_MARK = re.compile(r"#\s*not run by the tests:\s*(?P<reason>\S.*)$")
TIMEOUT_S = 240


def blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, first line number, code) of each fenced block."""
    out, lang, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        fence = re.match(r"^\s*```(\w*)\s*$", line)
        if fence and lang is None:
            lang, start, lines = fence.group(1) or "text", number + 1, []
        elif fence:
            out.append((lang, start, "\n".join(lines)))
            lang = None
        elif lang is not None:
            lines.append(line)
    return out


def commands(code: str, first_line: int) -> list[tuple[int, str]]:
    """(line number, command) of a bash block, continuation lines joined, comment-only lines dropped."""
    out, pending, start = [], "", 0
    for i, line in enumerate(code.splitlines()):
        if not pending:
            start = first_line + i
            if not line.strip() or line.lstrip().startswith("#"):
                continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def snippets() -> list:
    params = []
    for lang, line, code in blocks(README.read_text()):
        if lang == "python":
            params.append(pytest.param("python", code, id=f"README.md:{line}-python"))
        elif lang in ("bash", "sh", "shell"):
            for number, command in commands(code, line):
                if command.lstrip().startswith(".venv/bin/biaslab"):
                    params.append(pytest.param("bash", command, id=f"README.md:{number}-{command.split()[1]}"))
    return params


def skip_reason(code: str) -> str | None:
    for line in code.splitlines():
        m = SKIP_MARK.search(line)
        if m:
            return m.group("reason")
    return None


def expected_status(command: str) -> int:
    comment = command.split("#", 1)[1] if "#" in command else ""
    m = re.search(r"\bexit (\d+)", comment)
    return int(m.group(1)) if m else 0


@pytest.mark.parametrize("kind,code", snippets())
def test_readme_snippet_runs(kind, code):
    reason = skip_reason(code)
    if reason:
        pytest.skip(f"marked in README.md: {reason}")
    if kind == "python":
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
        assert r.returncode == 0, f"python block failed:\n{code}\n--- stderr:\n{r.stderr[-3000:]}"
        return
    argv = shlex.split(code, comments=True)
    argv[0] = str(BIN / Path(argv[0]).name)  # .venv/bin/biaslab -> this environment's biaslab
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    want = expected_status(code)
    assert r.returncode == want, f"{code}\nexit {r.returncode}, README says {want}\n--- stderr:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr


def test_every_command_uses_the_venv_prefix():
    bad = []
    for lang, line, code in blocks(README.read_text()):
        if lang not in ("bash", "sh", "shell"):
            continue
        for number, command in commands(code, line):
            if SKIP_MARK.search(command):
                continue
            first = command.split()[0]
            if not (first.startswith(".venv/bin/") or first in ("make", "cd", "export")):
                bad.append(f"README.md:{number}: {command.strip()}")
    assert not bad, "commands without the .venv/bin/ prefix:\n" + "\n".join(bad)


def test_the_parser_finds_the_snippets():
    kinds = [p.values[0] for p in snippets()]
    assert kinds.count("python") >= 3 and kinds.count("bash") >= 5
    assert commands("a \\\n  b  # c\n# only a comment\n\nd", 10) == [(10, "a    b  # c"), (14, "d")]
    assert expected_status(".venv/bin/biaslab check x:k3 --placement loss   # exact: BIASED, exit 1") == 1
    assert skip_reason("torchrun x  # not run by the tests: needs GPUs") == "needs GPUs"
