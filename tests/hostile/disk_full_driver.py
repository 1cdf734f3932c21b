"""Run CLI cases under a file-size limit, each in a forked child of one warmed-up interpreter.

``python -m tests.hostile.disk_full_driver CASES.json`` where the file holds a list of
``{"name", "argv", "cwd", "limit", "stderr"}``. Each child sets ``RLIMIT_FSIZE`` to ``limit``
(SIGXFSZ ignored, so writes fail with EFBIG as they fail with ENOSPC on a full disk), runs
``deployprune.cli.main(argv)`` in ``cwd`` with stderr sent to the file ``stderr``, and exits with
its return code. Prints ``{name: exit status}`` as JSON (negative: killed by that signal).
Forking one interpreter that imported torch once is much cheaper than a fresh process per case.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys

import torch

from deployprune import (
    cli,
    converters,  # noqa: F401 - imported before forking, like the CLI would
    zoo,  # noqa: F401
)


def _child(case: dict) -> None:
    try:
        fd = os.open(case["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.chdir(case["cwd"])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (case["limit"], case["limit"]))
        code = cli.main(case["argv"])
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - anything escaping main is reported as status 99
        code = 99
    os._exit(code)


def main() -> None:
    torch.set_num_threads(1)  # no intra-op thread pool exists when the children fork
    with open(sys.argv[1]) as fh:
        cases = json.load(fh)
    children = {}
    for case in cases:  # all at once: the cases are independent (own output directories)
        pid = os.fork()
        if pid == 0:
            _child(case)
        children[case["name"]] = pid
    status = {}
    for name, pid in children.items():
        _, raw = os.waitpid(pid, 0)
        status[name] = os.waitstatus_to_exitcode(raw)
    print(json.dumps(status))


if __name__ == "__main__":
    main()
