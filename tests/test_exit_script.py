"""A SIGTERM during a finished script's shutdown ends it with the script's own exit code, not -15."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import atexit, os, signal, time
from melecole.cli import exit_script

def slow_teardown():  # like torch / dask teardown after the last file was written
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
    print("teardown finished")

atexit.register(slow_teardown)
exit_script({code})
"""


def test_sigterm_while_exiting_keeps_the_exit_code():
    for code in (0, 2):
        result = subprocess.run([sys.executable, "-c", SCRIPT.format(code=code)], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == code, result.stderr
        assert "teardown finished" not in result.stdout  # ended at once
        assert "Traceback" not in result.stderr


def test_without_it_the_signal_kills_the_process():  # what the shims did before
    script = SCRIPT.replace("from melecole.cli import exit_script", "import sys").replace("exit_script(", "sys.exit(")
    result = subprocess.run([sys.executable, "-c", script.format(code=0)], capture_output=True, text=True, timeout=60)
    assert result.returncode == -15
