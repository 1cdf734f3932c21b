"""One document's Python interpreter: runs the blocks it is sent, in order, in one namespace.

Started by ``markdown_blocks.DocumentRun`` in the document's working directory. Requests are JSON
lines on stdin (``code``, ``setup``, ``filename``, ``line``); one JSON reply line per request goes
to the original stdout. Everything the blocks print (Python or C level) goes to stderr, which the
driver reads from a file. The code is compiled with the Markdown file's name and its line
numbers, so a traceback points at the line of the document.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def main() -> int:
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # block output (print, C-level writes) goes where the driver collects it
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.path[0] = os.getcwd()  # as `python` started in the reader's directory: its modules import
    namespace: dict = {"__name__": "__main__", "__builtins__": __builtins__}
    for request_line in sys.stdin:
        request = json.loads(request_line)
        ok, error = True, ""
        try:
            if request["setup"]:
                exec(compile(request["setup"], f"<setup of {request['filename']}:{request['line']}>", "exec"),
                     namespace)  # noqa: S102 - the project's own documentation
            code = "\n" * (request["line"] - 1) + request["code"]
            exec(compile(code, request["filename"], "exec"), namespace)  # noqa: S102
        except BaseException:  # noqa: BLE001 - every failure of a block is reported, SystemExit included
            ok, error = False, traceback.format_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        replies.write(json.dumps({"ok": ok, "error": error}) + "\n")
        replies.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
