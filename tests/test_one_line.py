"""One one-line-error helper (``deployprune.errors.one_line``) for the whole package (issue 12)."""

from __future__ import annotations

from deployprune import cli, data, pipeline
from deployprune.errors import one_line


def test_white_space_and_newlines_become_one_space() -> None:
    assert one_line("  a\n\tb   c \r\n") == "a b c"
    assert one_line(ValueError("bad\nvalue")) == "bad value"
    assert one_line(KeyError()) == ""


def test_limit_cuts_the_line() -> None:
    assert one_line("x" * 300, 200) == "x" * 200
    assert one_line("a  b", 10) == "a b"
    assert len(one_line("word " * 100)) == 499  # no limit by default


def test_no_module_keeps_a_copy_of_its_own() -> None:
    for module in (cli, data, pipeline):
        assert not hasattr(module, "_one_line"), module.__name__
