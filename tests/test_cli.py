import subprocess
import sys

from d3s2 import __version__
from d3s2.cli import main


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert __version__ in capsys.readouterr().out


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "d3s2", "--help"], capture_output=True, text=True, check=True).stdout
    assert "selfcheck" in out


def test_unknown_command_fails():
    proc = subprocess.run([sys.executable, "-m", "d3s2", "no-such-command"], capture_output=True, text=True)
    assert proc.returncode != 0
