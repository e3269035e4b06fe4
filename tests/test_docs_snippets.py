"""Every Python snippet of README.md and docs/*.md runs, as a reader would paste it.

The snippets are the fenced ``python`` blocks. A block right after the comment
``<!-- snippet: skip (REASON) -->`` is reported as skipped with that reason (it needs a GPU,
a running server or a real Stable Diffusion checkpoint). The others run in order, each page's
snippets in one fresh interpreter and working folder where the placeholder paths the docs use
(``path/to/model``, ``path/to/sd15``, ...) are the tiny random-weight diffusers model, so
"export this folder, then load the bundle" runs for real on a small model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARK = re.compile(r"<!--\s*snippet:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")
#: Placeholder model folders the docs name; each becomes a link to the tiny model.
PLACEHOLDER_MODELS = ("path/to/model", "path/to/sd15", "path/to/stable-diffusion-folder")
#: Pages other sessions own, whose server snippets carry no marker yet: skipped for the reason given.
UNMARKED_SKIPS = {
    "docs/serving.md": ("127.0.0.1:800", "needs a running cfgswitch server (serving is tested by tests/test_serving_server.py)"),
}


@dataclass(frozen=True)
class Snippet:
    """One fenced python block: where it is, its code and, when marked, why it is not run."""

    file: str
    line: int
    code: str
    skip: Optional[str]

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def extract_snippets(path: Path) -> List[Snippet]:
    """The fenced ``python`` blocks of a markdown file, with their skip markers."""
    rel = path.relative_to(ROOT).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    out: List[Snippet] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            j = start
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            mark = SKIP_MARK.search(prev)
            code = "\n".join(lines[start:j]) + "\n"
            skip = mark.group("reason") if mark else None
            if skip is None and rel in UNMARKED_SKIPS and UNMARKED_SKIPS[rel][0] in code:
                skip = UNMARKED_SKIPS[rel][1]
            out.append(Snippet(rel, start, code, skip))
            i = j
        i += 1
    return out


SNIPPETS = [s for f in DOC_FILES for s in extract_snippets(f)]


def test_the_extractor_finds_snippets_and_markers(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n<!-- snippet: skip (needs a GPU) -->\n\n```python\nimport cuda\n```\n"
                    "```bash\nls\n```\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    got = extract_snippets(page)
    assert [(s.line, s.code, s.skip) for s in got] == [(3, "x = 1\n", None), (9, "import cuda\n", "needs a GPU")]
    assert len(SNIPPETS) >= 8 and {s.file for s in SNIPPETS} >= {"README.md", "docs/kernels.md", "docs/analysis.md"}


#: Runs one page's snippets in order in a fresh interpreter (as a reader pastes them), one JSON line each.
RUNNER = r"""
import json, sys, traceback
import torch
torch.set_num_threads(1)
namespace = {"__name__": "__snippet__"}
for item in json.load(sys.stdin):
    try:
        exec(compile(item["code"], item["id"], "exec"), namespace)
        print(json.dumps({"line": item["line"], "ok": True}), flush=True)
    except BaseException:
        print(json.dumps({"line": item["line"], "ok": False, "error": traceback.format_exc()}), flush=True)
"""


@pytest.fixture(scope="module")
def page_results(tmp_path_factory, tiny_model_dir):
    """Per markdown file: ``{line: (ok, error)}`` of its runnable snippets, run once in a subprocess.

    Each page runs in its own interpreter and working folder, where the placeholder model paths
    are links to the tiny model, so one page's snippets cannot change what another's see.
    """
    results: Dict[str, Dict[int, tuple]] = {}

    def get(file: str) -> Dict[int, tuple]:
        if file not in results:
            d = tmp_path_factory.mktemp("snippets-" + file.replace("/", "-").replace(".md", ""))
            for placeholder in PLACEHOLDER_MODELS:
                link = d / placeholder
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(tiny_model_dir, target_is_directory=True)
            todo = [{"id": s.id, "line": s.line, "code": s.code} for s in SNIPPETS if s.file == file and not s.skip]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
            proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(todo), capture_output=True, text=True,
                                  cwd=d, env=env, timeout=600)
            got = {}
            for line in proc.stdout.splitlines():
                if line.startswith("{"):
                    r = json.loads(line)
                    got[r["line"]] = (r["ok"], r.get("error", ""))
            for item in todo:  # a snippet without a line: the interpreter died before or in it
                got.setdefault(item["line"], (False, f"no result (exit code {proc.returncode}): {proc.stderr[-2000:]}"))
            results[file] = got
        return results[file]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_snippet_runs(snippet, page_results):
    if snippet.skip:
        pytest.skip(f"{snippet.id}: {snippet.skip}")
    ok, error = page_results(snippet.file)[snippet.line]
    assert ok, f"{snippet.id} failed:\n{error}"
