"""Find the code blocks of the Markdown documentation and run them as a reader would.

A document is read top to bottom in a working directory of its own that looks like a clone of
the repository (its top-level entries are linked in), so ``models/samples/lenet.pt`` resolves
as it does for a reader, and everything a block writes lands in that directory.

* ``bash``/``sh``/``shell`` blocks run with ``bash -e``; ``console`` blocks run their ``$ ``
  lines (a trailing backslash continues a command). The virtual environment's ``bin`` comes
  first on ``PATH``, so ``deployprune`` and ``python`` are the installed ones.
* ``python`` blocks of one document run, in order, in one Python process and one namespace
  (as if typed into one interpreter started in that directory): a later block sees the names an
  earlier one defined. The process starts at the document's first Python block.
* Every other fence (``text``, ``json``, ``toml`` ...) is not run, unless a marker writes it to a
  file. A fence without a language is an error, so a command cannot hide from the collector.

A marker is the existing ``<!-- tested -->`` comment, right before the fence (blank lines
allowed), with options:

``<!-- tested -->``                   runs (every shell/Python block does; the bare marker is optional)
``<!-- tested slow -->``              takes more than about a minute; runs, carries ``pytest.mark.slow``
``<!-- tested skip="why" -->``        not run; the reason is required and shown by pytest
``<!-- tested setup="code" -->``      code run first, unseen by the reader (Python: same namespace;
                                      shell: same script). It stands in for what the page assumes
                                      the reader has, e.g. ``setup="model = zoo.build('lenet')"``
``<!-- tested file="NAME" -->``       the block's text is written to NAME in the working directory
                                      (any language; a shell/Python block is then not run)

See docs/doc-tests.md.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_worker.py")

SHELL_LANGS = {"bash", "sh", "shell", "console"}
PYTHON_LANGS = {"python", "py"}
MARKER_OPTIONS = {"slow", "skip", "setup", "file"}
BLOCK_TIMEOUT_S = 1800  # a hang guard, not a speed check
#: Shell commands a test never runs, whatever the page says: they change the environment the tests
#: run in (an editable ``pip install`` from the working directory re-points the installed package)
#: or start the test suite from inside itself. A block with one must carry ``skip="..."``.
NEVER_RUN = re.compile(r"\b(?:pip3?|apt-get|apt|brew|conda)\s+(?:-\S+\s+)*(?:install|uninstall)\b|\bpytest\b"
                       r"|\.ci/run\b")

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*?)\s*$")
_OPTION = re.compile(r'\s*([a-z][a-z0-9_-]*)(?:="((?:[^"\\]|\\.)*)")?')


class MarkerError(ValueError):
    """A malformed ``<!-- tested ... -->`` marker (names the document and line)."""


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # 1-based line of the first code line (the line after the opening fence)
    lang: str
    code: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        if "file" in self.options:
            return "file"
        if self.lang in SHELL_LANGS:
            return "shell"
        if self.lang in PYTHON_LANGS:
            return "python"
        return "other"

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO) if self.doc.is_relative_to(REPO) else self.doc}:{self.line}"


def documents() -> list[Path]:
    """README.md and every page of docs/, in a stable order."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def parse_marker(comment: str, where: str) -> dict[str, str]:
    """Options of ``<!-- tested ... -->`` (without the comment delimiters' text)."""
    body = comment.strip()
    assert body.startswith("tested")
    rest = body[len("tested"):]
    if rest.startswith(":"):
        rest = rest[1:]
    options: dict[str, str] = {}
    pos = 0
    while rest[pos:].strip():
        m = _OPTION.match(rest, pos)
        if not m or m.end() == pos:
            raise MarkerError(f"{where}: cannot read the marker at {rest[pos:].strip()[:40]!r}; "
                              'expected options like slow, skip="reason", setup="code", file="name"')
        name, value = m.group(1), m.group(2)
        if name not in MARKER_OPTIONS:
            raise MarkerError(f"{where}: unknown marker option {name!r}; known: {', '.join(sorted(MARKER_OPTIONS))}")
        if name in {"skip", "setup", "file"} and not value:
            raise MarkerError(f'{where}: marker option {name} needs a value ({name}="...")')
        options[name] = "" if value is None else value.replace('\\"', '"').replace("\\\\", "\\")
        pos = m.end()
    return options


def _marker_before(lines: list[str], fence_index: int, doc: Path) -> dict[str, str] | None:
    """The ``tested`` marker ending on the last non-blank line before ``fence_index``, if any."""
    i = fence_index - 1
    while i >= 0 and not lines[i].strip():
        i -= 1
    if i < 0 or not lines[i].rstrip().endswith("-->"):
        return None
    end = i
    while i >= 0 and "<!--" not in lines[i]:
        i -= 1
    if i < 0:
        return None
    text = "\n".join(lines[i:end + 1]).strip()
    if not text.startswith("<!--"):
        return None
    inner = text[len("<!--"):-len("-->")].strip()
    if not re.match(r"tested\b", inner):
        return None
    return parse_marker(inner, f"{doc.name}:{i + 1}")


def parse(doc: Path) -> tuple[list[Block], list[int]]:
    """The fenced blocks of ``doc`` and the (1-based) lines of fences that name no language."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    unlabelled: list[int] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m.group("fence"), len(m.group("indent"))
        lang = m.group("info").split()[0].lower() if m.group("info") else ""
        options = _marker_before(lines, i, doc) or {}
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            close = lines[j].strip()
            if close.startswith(fence[0] * len(fence)) and not close.strip(fence[0]):
                break
            line = lines[j]
            body.append(line[indent:] if line[:indent].strip() == "" else line.lstrip())
            j += 1
        if not lang:
            unlabelled.append(i + 1)
        blocks.append(Block(doc, i + 2, lang, "\n".join(body) + "\n", options))
        i = j + 1
    return blocks, unlabelled


def console_commands(code: str) -> str:
    """The commands of a ``console`` block: ``$ `` lines and their backslash continuations (whose
    ``> `` continuation prompt is dropped); everything else is output."""
    out: list[str] = []
    continuing = False
    for line in code.splitlines():
        if continuing or line.startswith("$ "):
            text = (line[2:] if line.startswith("> ") else line) if continuing else line[2:]
            out.append(text)
            continuing = text.rstrip().endswith("\\")
    return "\n".join(out) + "\n"


def environment() -> dict[str, str]:
    """The reader's shell: the venv's bin first on PATH, one thread per runtime (a shared machine)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["VIRTUAL_ENV"] = str(Path(sys.executable).parent.parent)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTEST_CURRENT_TEST", "PYTEST_ADDOPTS"):
        env.pop(name, None)
    return env


def make_clone_view(workdir: Path) -> None:
    """Link the repository's top-level entries into ``workdir`` (what a reader's clone shows)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for entry in REPO.iterdir():
        if entry.name.startswith(".") or entry.name.endswith(".egg-info") or entry.name == "__pycache__":
            continue
        link = workdir / entry.name
        if not link.exists():
            link.symlink_to(entry, target_is_directory=entry.is_dir())


class BlockFailed(AssertionError):
    pass


class DocumentRun:
    """Runs the blocks of one document in order in ``workdir``; one Python process per document."""

    def __init__(self, doc: Path, blocks: list[Block], workdir: Path, scratch: Path) -> None:
        self.doc, self.blocks, self.workdir, self.scratch = doc, blocks, workdir, scratch
        self.results: dict[int, str | None] = {}  # block index -> None (passed) or failure text
        self.env = environment()
        self._worker: subprocess.Popen | None = None
        self._worker_log: Path | None = None
        make_clone_view(workdir)
        scratch.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------- running
    def run_before(self, index: int) -> Block | None:
        """Run the blocks before ``index`` not run yet, in order; the first that failed, if any."""
        for k in range(index):
            if k not in self.results:
                self.results[k] = self._run_one(self.blocks[k])
            if self.results[k] is not None:
                return self.blocks[k]
        return None

    def run_block(self, index: int) -> None:
        """Run block ``index`` (once); raise ``BlockFailed`` with its output when it failed."""
        if index not in self.results:
            self.results[index] = self._run_one(self.blocks[index])
        failure = self.results[index]
        if failure is not None:
            raise BlockFailed(failure)

    def _run_one(self, block: Block) -> str | None:
        if "skip" in block.options:
            return None
        try:
            if block.kind == "file":
                target = self.workdir / block.options["file"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(block.code, encoding="utf-8")
                return None
            if block.kind == "shell":
                return self._run_shell(block)
            if block.kind == "python":
                return self._run_python(block)
        except subprocess.TimeoutExpired:
            return f"{block.where}: still running after {BLOCK_TIMEOUT_S} s"
        return None

    def _run_shell(self, block: Block) -> str | None:
        code = console_commands(block.code) if block.lang == "console" else block.code
        if NEVER_RUN.search(code):
            return (f"{block.where}: the block runs {NEVER_RUN.search(code).group(0)!r}, which would change the "
                    'test environment or run the suite inside itself; mark it <!-- tested skip="why" -->')
        script = self.scratch / f"block_{block.line}.sh"
        script.write_text(block.options.get("setup", "") + "\n" + code, encoding="utf-8")
        proc = subprocess.run(["bash", "-e", str(script)], cwd=self.workdir, env=self.env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
        if proc.returncode == 0:
            return None
        return (f"{block.where}: the {block.lang} block exited {proc.returncode}\n--- block ---\n{code}"
                f"--- stdout ---\n{_tail(proc.stdout)}\n--- stderr ---\n{_tail(proc.stderr)}")

    def _start_worker(self) -> subprocess.Popen:
        self._worker_log = self.scratch / "python.log"
        log = self._worker_log.open("w")
        self._worker = subprocess.Popen([sys.executable, str(WORKER)], cwd=self.workdir, env=self.env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        return self._worker

    def _run_python(self, block: Block) -> str | None:
        worker = self._worker or self._start_worker()
        assert self._worker_log is not None and worker.stdin and worker.stdout
        offset = self._worker_log.stat().st_size
        request = {"code": block.code, "setup": block.options.get("setup", ""), "filename": str(block.doc),
                   "line": block.line}
        worker.stdin.write(json.dumps(request) + "\n")
        worker.stdin.flush()
        ready, _, _ = select.select([worker.stdout], [], [], BLOCK_TIMEOUT_S)
        if not ready:
            worker.kill()
            worker.wait()
            self._worker = None
            raise subprocess.TimeoutExpired(str(WORKER), BLOCK_TIMEOUT_S)
        reply = worker.stdout.readline()
        with self._worker_log.open() as f:
            f.seek(offset)
            output = f.read()
        if not reply:
            worker.wait(timeout=30)
            self._worker = None
            return (f"{block.where}: the Python process died (exit {worker.returncode})\n--- block ---\n"
                    f"{block.code}--- output ---\n{_tail(output)}")
        result = json.loads(reply)
        if result["ok"]:
            return None
        return f"{block.where}: the python block failed\n--- output ---\n{_tail(output)}\n{result['error']}"

    def close(self) -> None:
        if self._worker is not None:
            assert self._worker.stdin
            self._worker.stdin.close()
            try:
                self._worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._worker.kill()
                self._worker.wait()
            self._worker = None


def _tail(text: str, limit: int = 6000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]
