"""Running a benchmark's measurement in a fresh interpreter, so its memory and imports are its own."""

from __future__ import annotations

import json
import subprocess
import sys


def run_child(script: str, *args: str) -> dict:
    """Run ``script`` (Python source) with ``args``; its last stdout line is a JSON object, returned."""
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])
