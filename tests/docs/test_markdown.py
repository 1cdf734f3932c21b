"""Docs are tests: every shell and Python block of README.md and docs/*.md runs as written.

One test per block, named ``README.md:60`` after the block's first line. The blocks of a
document run in order in one working directory (Python blocks in one interpreter), so running a
single block's test runs the blocks before it first. How to mark blocks: docs/doc-tests.md and
``tests/docs/markdown_blocks.py``.
"""

from __future__ import annotations

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
