"""Every code block of README.md and docs/*.md runs, so the docs cannot rot (conventions: docs/testing.md).

* ```` ```python ```` blocks of one page run in order in one namespace (one fresh Python process per page).
* A line starting with ``$ `` (in a fenced block other than python, or in the text) is a command that runs
  (``\\`` continues it on the next line); lines without ``$ `` (installs, GPU runs, real models) are not run.
* Items run in document order in a temporary folder that holds links to the repository's files, so
  ``python training/x.py`` and relative paths work and outputs (``concepts/``, ``outputs/``, ...) land there.
* ``<!-- test: run-with FLAGS -->`` on the line before a fence: every command line of the block (not ``pip``,
  ``apt-get``, ``accelerate`` or comments) runs with ``FLAGS`` appended: the real-size command is shown and
  runs with tiny settings (argparse keeps the last value of a flag).
* ``<!-- test: skip REASON -->`` on the line before a fence: that block is not run (the reason is required).
  ``<!-- test: requires MODULE ... -->`` anywhere in a page: the page is skipped when a module is missing.

The fast tier only parses: python blocks compile, scripts named in commands exist, and the README's test
install lines are exactly what ``.ci/run`` installs. Running the pages is ``slow``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)```+\s*([\w+-]*)")
MARK = re.compile(r"<!--\s*test:\s*(skip|requires|run-with)\b\s*(.*?)\s*-->")
NOT_RUN = ("pip ", "apt-get ", "sudo ", "accelerate ", "#")  # in run-with blocks: installs and launchers

RUNNER = r'''
import json, subprocess, sys, traceback
items = json.load(open(sys.argv[1]))
ns = {"__name__": "__main__"}
for it in items:
    where = f"{it['page']}:{it['line']}"
    print(f"--- {where} ({it['kind']})", flush=True)
    if it["kind"] == "python":
        try:
            exec(compile(it["code"], where, "exec"), ns)
        except BaseException:
            traceback.print_exc()
            print(f"FAILED python block at {where}", flush=True)
            sys.exit(1)
    else:
        print("$ " + it["code"], flush=True)
        rc = subprocess.run(it["code"], shell=True, executable="/bin/bash").returncode
        if rc != 0:
            print(f"FAILED (exit status {rc}) command at {where}: {it['code']}", flush=True)
            sys.exit(1)
'''


def parse_page(path: Path) -> dict:
    """``{"items": [{kind, code, line, page}], "requires": [...], "skipped": [(line, reason)]}`` of one page."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = str(path.relative_to(ROOT))
    out = {"items": [], "requires": [], "skipped": []}
    i = 0
    while i < len(lines):
        for kind, arg in MARK.findall(lines[i]) if lines[i].lstrip().startswith("<!--") else []:
            if kind == "requires":  # a directive on its own line (not one quoted in the text)
                out["requires"] += arg.split()
        m = FENCE.match(lines[i])
        if not m:
            if lines[i].startswith("$ "):  # a command line in the text, outside any fence
                out["items"].append({"kind": "command", "code": _joined(lines, i)[0], "line": i + 1, "page": rel})
                i = _joined(lines, i)[1]
            i += 1
            continue
        indent, lang = len(m.group(1)), m.group(2).lower()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        i += 1  # closing fence
        prev = next((lines[j] for j in range(start - 2, -1, -1) if lines[j].strip()), "")
        skip = [a for k, a in MARK.findall(prev) if k == "skip"]
        if skip:
            assert skip[0], f"{rel}:{start}: '<!-- test: skip -->' needs a reason"
            out["skipped"].append((start, skip[0]))
            continue
        run_with = [a for k, a in MARK.findall(prev) if k == "run-with"]
        if run_with:  # the block's commands run with tiny settings appended (argparse: the last value wins)
            j = 0
            while j < len(body):
                if body[j].strip() and not body[j].lstrip().startswith(NOT_RUN):
                    cmd, last = _joined(["$ " + body[j]] + body[j + 1:], 0)
                    cmd = cmd.split(" #")[0].strip()
                    out["items"].append({"kind": "command", "code": f"{cmd} {run_with[0]}".strip(),
                                         "line": start + 1 + j, "page": rel})
                    j += last
                j += 1
            continue
        if lang == "python":
            out["items"].append({"kind": "python", "code": "\n".join(body), "line": start + 1, "page": rel})
            continue
        j = 0
        while j < len(body):  # `$ ` command lines, with backslash continuations
            if body[j].startswith("$ "):
                cmd, last = _joined(body, j)
                out["items"].append({"kind": "command", "code": cmd, "line": start + 1 + j, "page": rel})
                j = last
            j += 1
    return out


def _joined(lines: list[str], j: int) -> tuple[str, int]:
    """The ``$ `` command starting at ``lines[j]`` with its ``\\`` continuations, and the index of its last line."""
    cmd = lines[j][2:]
    while cmd.rstrip().endswith("\\") and j + 1 < len(lines):
        j += 1
        cmd = cmd.rstrip()[:-1] + " " + lines[j].strip()
    return cmd.strip(), j


def _ids(pages):
    return [str(p.relative_to(ROOT)) for p in pages]


def test_pages_exist_and_parse():
    assert (ROOT / "README.md").exists()
    for page in PAGES:
        parse_page(page)  # a skip marker without a reason fails here


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_blocks_compile_and_scripts_exist(page):
    """Fast: python blocks compile; every ``python path/x.py`` in a command names a file of the repository."""
    info = parse_page(page)
    for it in info["items"]:
        where = f"{it['page']}:{it['line']}"
        if it["kind"] == "python":
            compile(it["code"], where, "exec")
            continue
        lex = shlex.shlex(it["code"], posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        parts, words = [], []
        for tok in lex:  # split on &&, ;, | outside quotes
            if tok and set(tok) <= set("&;|()<>"):
                parts.append(words)
                words = []
            else:
                words.append(tok)
        for words in parts + [words]:
            while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
                words = words[1:]
            if len(words) >= 2 and Path(words[0]).name.startswith("python") and words[1].endswith(".py"):
                assert (ROOT / words[1]).is_file(), f"{where}: {words[1]} does not exist"
    text = page.read_text(encoding="utf-8")
    for link in re.findall(r"\]\(((?:docs|benchmarks|training|tests|spectral_vision|fusion|demos)/[^)#\s]+)", text):
        assert (page.parent / link).exists() or (ROOT / link).exists(), f"{page.name}: broken link {link}"


def _install_lines(text: str) -> list[str]:
    """``pip install`` commands, normalised (no ``-q``, one space, no trailing ``&&`` chains split)."""
    out = []
    for line in text.splitlines():
        for part in line.split("&&"):
            words = [w for w in part.split() if w != "-q"]
            if words[:2] == ["pip", "install"]:
                out.append(" ".join(words))
    return out


def test_readme_test_install_is_what_ci_runs():
    """The README's "install and test" block installs exactly the packages .ci/run installs."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"<!-- ci:install -->\s*```bash\n(.*?)```", readme, re.S)
    assert len(blocks) == 1, "README needs one ```bash block right after '<!-- ci:install -->'"
    ci = (ROOT / ".ci" / "run").read_text()
    assert _install_lines(blocks[0]) == _install_lines(ci)
    assert "python -m pytest" in blocks[0] and "python -m pytest" in ci


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_page_runs(page, tmp_path):
    """Run the page's python blocks and ``$`` commands in order, in a scratch folder linked to the repository."""
    info = parse_page(page)
    missing = [m for m in info["requires"] if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{page.name} requires {missing} (<!-- test: requires -->)")
    if not info["items"]:
        pytest.skip(f"{page.name} has no runnable block")
    ignored = {ln.strip().strip("/") for ln in (ROOT / ".gitignore").read_text().splitlines() if ln.startswith("/")}
    work = tmp_path / "work"
    work.mkdir()
    for entry in ROOT.iterdir():  # the repository's files, but none of the output folders the docs write
        if entry.name not in ignored and entry.name not in {".git", ".pytest_cache"}:
            (work / entry.name).symlink_to(entry)
    (tmp_path / "items.json").write_text(json.dumps(info["items"]))
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "items.json")], cwd=work,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout[-6000:] + "\n" + proc.stderr[-6000:])
