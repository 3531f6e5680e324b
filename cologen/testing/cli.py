"""`cologen ARGS` run in this process (the tests of the command line), with its exit status and output."""

from __future__ import annotations


def run_in_process(capfd, *args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `cologen ARGS`; `capfd` is pytest's fixture."""
    from cologen.cli import main

    capfd.readouterr()
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    out, err = capfd.readouterr()
    return code, out, err
