"""One one-line-error helper (``deployprune.errors.one_line``) for the whole package (issue 12)."""

from __future__ import annotations

import importlib
import inspect
import re

from deployprune.errors import one_line


def test_white_space_and_newlines_become_one_space() -> None:
    assert one_line("  a\n\tb   c \r\n") == "a b c"
    assert one_line(ValueError("bad\nvalue")) == "bad value"
    assert one_line(KeyError()) == "KeyError"  # an exception without a message: its type
    assert one_line("") == ""


def test_limit_cuts_the_line_and_says_so() -> None:
    assert one_line("x" * 300, 200) == "x" * 197 + "..."
    assert len(one_line("x" * 300, 200)) == 200
    assert one_line("a  b", 10) == "a b"
    assert len(one_line("word " * 100)) == 499  # no limit by default


def test_first_line_and_colour_codes() -> None:
    text = "\x1b[31mExporter failed\x1b[0m: bad op\n\nTraceback (most recent call last):\n  File x"
    assert one_line(text, first_line=True) == "Exporter failed: bad op"
    assert one_line("\n\n  second  \nthird", first_line=True) == "second"


MODULES = ["deployprune.cli", "deployprune.data", "deployprune.pipeline", "deployprune.io", "deployprune.hf",
           "deployprune._imports", "deployprune.training.loop", "deployprune.converters.onnx",
           "deployprune.converters.coreml"]


def test_no_module_keeps_a_copy_of_its_own() -> None:
    """No private one-line helper, and no inline ``" ".join(str(exc).split())`` either."""
    for name in MODULES:
        module = importlib.import_module(name)
        for helper in ("_one_line", "_first_line", "_short_error"):
            assert not hasattr(module, helper), f"{name}.{helper}"
        source = inspect.getsource(module)
        assert not re.search(r'" "\.join\(str\((exc|e)\)\.split\(\)\)', source), name
