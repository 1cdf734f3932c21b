"""The Markdown collector itself, on a small page written here: what runs, in what order, with what."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.markdown_blocks import BlockFailed, DocumentRun, MarkerError, console_commands, parse

PAGE = '''# A page

```bash
echo one > made.txt
```

<!-- tested setup="x = 40" -->
```python
from pathlib import Path
y = x + 2
assert Path("made.txt").read_text() == "one\\n"
```

Some text.

<!-- tested file="config.json" -->
```json
{"a": 1}
```

```console
$ python -c "import json; print(json.load(open('config.json'))['a'])" \\
>   > copied.txt
output that is not run
$ test -s copied.txt
```

<!-- tested skip="needs your own file" -->
```bash
deployprune export your_model.pt
```

```text
deployprune export MODEL [OPTIONS]
```

````text
```bash
not a block of its own
```
````

```python
assert y == 42
print("from the page")
```
'''


def _page(tmp_path: Path, text: str) -> Path:
    doc = tmp_path / "page.md"
    doc.write_text(text)
    return doc


def _run(tmp_path: Path, doc: Path) -> DocumentRun:
    blocks, _ = parse(doc)
    return DocumentRun(doc, blocks, tmp_path / "work", tmp_path / "scratch")


def test_blocks_languages_and_markers(tmp_path: Path) -> None:
    blocks, unlabelled = parse(_page(tmp_path, PAGE))
    assert [(b.lang, b.kind) for b in blocks] == [
        ("bash", "shell"), ("python", "python"), ("json", "file"), ("console", "shell"), ("bash", "shell"),
        ("text", "other"), ("text", "other"), ("python", "python")]
    assert blocks[1].options == {"setup": "x = 40"}
    assert blocks[4].options == {"skip": "needs your own file"}
    assert blocks[0].line == 4 and blocks[0].code == "echo one > made.txt\n"
    assert "not a block of its own" in blocks[6].code  # a longer fence holds a shorter one
    assert unlabelled == []


def test_page_runs_in_order_in_one_directory_and_one_namespace(tmp_path: Path) -> None:
    doc = _page(tmp_path, PAGE)
    run = _run(tmp_path, doc)
    try:
        for i, block in enumerate(run.blocks):
            assert run.run_before(i) is None
            if block.kind != "other":
                run.run_block(i)
        assert (run.workdir / "config.json").read_text() == '{"a": 1}\n'
        assert (run.workdir / "copied.txt").read_text() == "1\n"
        assert (run.workdir / "models").is_symlink()  # the clone view
    finally:
        run.close()


def test_a_failing_block_names_the_page_line(tmp_path: Path) -> None:
    doc = _page(tmp_path, "```python\na = 1\nraise ValueError('drifted')\n```\n\n```bash\nfalse\necho after\n```\n")
    run = _run(tmp_path, doc)
    try:
        with pytest.raises(BlockFailed) as info:
            run.run_block(0)
        assert "page.md:2: the python block failed" in str(info.value)
        assert f'File "{doc}", line 3' in str(info.value)  # the traceback points at the Markdown line
        assert "ValueError: drifted" in str(info.value)
        with pytest.raises(BlockFailed, match="the bash block exited 1"):  # bash -e stops at `false`
            run.run_block(1)
        assert run.run_before(1) is run.blocks[0]
    finally:
        run.close()


def test_environment_changing_commands_never_run(tmp_path: Path) -> None:
    doc = _page(tmp_path, "```bash\npip install something\n```\n")
    run = _run(tmp_path, doc)
    with pytest.raises(BlockFailed, match="mark it <!-- tested skip="):
        run.run_block(0)


@pytest.mark.parametrize(("marker", "message"), [
    ("<!-- tested skip -->", "marker option skip needs a value"),
    ('<!-- tested fast="yes" -->', "unknown marker option 'fast'"),
    ("<!-- tested skip=unquoted -->", "marker option skip needs a value"),
    ('<!-- tested "slow" -->', "cannot read the marker"),
])
def test_bad_markers_are_errors(tmp_path: Path, marker: str, message: str) -> None:
    with pytest.raises(MarkerError, match=message):
        parse(_page(tmp_path, f"{marker}\n```bash\necho\n```\n"))


def test_unlabelled_fences_are_found(tmp_path: Path) -> None:
    _, unlabelled = parse(_page(tmp_path, "text\n\n```\ndeployprune export x\n```\n"))
    assert unlabelled == [3]


def test_console_commands() -> None:
    assert console_commands("$ a \\\n>   b\nout\n$ c\n") == "a \\\n  b\nc\n"  # "> " is the shell's prompt
