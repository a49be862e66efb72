"""`ssmstream` itself: usage asked for goes to stdout (exit 0); a missing or unknown command
is a usage error on stderr (exit 2), as argparse's are."""

from __future__ import annotations

from ssmstream.runtime import cli


def test_usage_and_usage_errors(capsys):
    assert cli.main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: ssmstream <command>") and "serve" in out and not err
    for argv in ([], ["no-such-command"]):
        assert cli.main(argv) == 2
        out, err = capsys.readouterr()
        assert not out and "usage: ssmstream <command>" in err
