"""``python -m tests.faulty_cli ARGS``: the command line with an ONNX target that writes wrong artifacts.

The real export is written, then two output channels of its last layer are swapped
(tests/faults.py), so ``deployprune export`` meets a genuinely wrong artifact in its validation.
"""

from __future__ import annotations

import sys

from deployprune import cli
from tests.faults import faulty_onnx_target

if __name__ == "__main__":
    with faulty_onnx_target():
        code = cli.main(sys.argv[1:])
    sys.exit(code)
