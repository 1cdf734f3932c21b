"""Docs are tests: every shell and Python block of README.md and docs/*.md runs as written.

One test per block, named ``README.md:60`` after the block's first line. The blocks of a
document run in order in one working directory (Python blocks in one interpreter), so running a
single block's test runs the blocks before it first. How to mark blocks: docs/doc-tests.md and
``tests/docs/markdown_blocks.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docs.markdown_blocks import REPO, Block, BlockFailed, DocumentRun, MarkerError, documents, parse


def _collect() -> tuple[list, dict[Path, list[Block]], list[str]]:
    params, by_doc, problems = [], {}, []
    for doc in documents():
        try:
            blocks, unlabelled = parse(doc)
        except MarkerError as exc:
            problems.append(str(exc))
            continue
        rel = doc.relative_to(REPO)
        problems += [f"{rel}:{line}: a fence without a language (say bash/python to run it, text for "
                     "output or syntax)" for line in unlabelled]
        by_doc[doc] = blocks
        for index, block in enumerate(blocks):
            if block.kind == "other":
                continue
            marks = [pytest.mark.slow] if "slow" in block.options else []
            params.append(pytest.param(doc, index, id=f"{rel}:{block.line}", marks=marks))
    return params, by_doc, problems


PARAMS, BLOCKS, PROBLEMS = _collect()


@pytest.fixture(scope="session")
def doc_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[Path, DocumentRun]]:
    runs: dict[Path, DocumentRun] = {}
    yield runs
    for run in runs.values():
        run.close()


def _run_for(doc: Path, runs: dict[Path, DocumentRun], tmp_path_factory: pytest.TempPathFactory) -> DocumentRun:
    if doc not in runs:
        base = tmp_path_factory.mktemp(doc.stem.replace(".", "_"))
        runs[doc] = DocumentRun(doc, BLOCKS[doc], base / "work", base / "scratch")
    return runs[doc]


def test_markers_and_fences_are_readable() -> None:
    """Every fence names its language and every ``<!-- tested ... -->`` marker parses."""
    assert not PROBLEMS, "\n".join(PROBLEMS)


def test_skips_give_a_reason() -> None:
    skipped = [b for blocks in BLOCKS.values() for b in blocks if "skip" in b.options]
    assert all(b.options["skip"].strip() for b in skipped)


@pytest.mark.parametrize(("doc", "index"), PARAMS)
def test_block(doc: Path, index: int, doc_runs: dict[Path, DocumentRun],
               tmp_path_factory: pytest.TempPathFactory) -> None:
    block = BLOCKS[doc][index]
    if "skip" in block.options:
        pytest.skip(f"{block.where}: {block.options['skip']}")
    run = _run_for(doc, doc_runs, tmp_path_factory)
    earlier = run.run_before(index)
    if earlier is not None:
        pytest.skip(f"not run: the earlier block {earlier.where} of this page failed")
    failure = None
    try:
        run.run_block(index)
    except BlockFailed as exc:
        failure = str(exc)
    if failure is not None:
        pytest.fail(failure, pytrace=False)


_COMMAND = re.compile(r"(?:^|[\s;&|(])deployprune\s+([a-z][a-z-]*)(.*)")
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _command_lines(code: str) -> list[str]:
    """Lines of ``code`` with their continuations joined: a trailing backslash, or (in a synopsis)
    an indented line after a ``deployprune`` line."""
    out: list[str] = []
    for line in code.splitlines():
        if out and (out[-1].endswith("\\") or (line[:1].isspace() and "deployprune" in out[-1])):
            out[-1] = out[-1].rstrip("\\") + " " + line.strip()
        else:
            out.append(line.rstrip())
    return out


def test_documented_flags_exist() -> None:
    """Every ``--flag`` a block (command, synopsis or output) gives a ``deployprune`` command is one
    that command takes: a synopsis is text, not run, so this is what keeps it from drifting
    (docs/validate.md listed ``--data FILE.pt``, which validate never had)."""
    import argparse

    from deployprune.cli import build_parser

    parser = build_parser()
    global_opts = {o for a in parser._actions for o in a.option_strings}
    commands = {name: {o for a in sub._actions for o in a.option_strings} | global_opts
                for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                for name, sub in action.choices.items()}
    unknown = []
    for blocks in BLOCKS.values():
        for block in blocks:
            for line in _command_lines(block.code):
                m = _COMMAND.search(line)
                if not m or m.group(1) not in commands:
                    continue
                text = m.group(2).split(" # ")[0]
                unknown += [f"{block.where}: deployprune {m.group(1)} {flag}" for flag in _FLAG.findall(text)
                            if flag not in commands[m.group(1)]]
    assert not unknown, "flags the commands do not take:\n" + "\n".join(unknown)
