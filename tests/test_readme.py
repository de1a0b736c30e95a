"""The README's quickstart runs as pasted and trains: a newcomer's first contact must not fail."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart() -> str:
    """The first Python block of the README's "Quickstart" section."""
    use = README.read_text().split("\n## Quickstart\n", 1)[1]
    return re.search(r"```python\n(.*?)```", use, re.DOTALL).group(1)


def test_the_quickstart_runs_as_pasted_and_its_loss_falls(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart())
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    full_rank = [float(v) for v in re.findall(r"^full-rank loss (\S+)$", done.stdout, re.MULTILINE)]
    facto = [float(v) for v in re.findall(r"^facto loss (\S+)$", done.stdout, re.MULTILINE)]
    assert len(full_rank) == 1 and len(facto) == 2, done.stdout[-2000:]
    assert facto[-1] < facto[0] < full_rank[0], (full_rank, facto)
    assert re.search(r"^total .*\(\d+\.\d+ % of vanilla\)$", done.stdout, re.MULTILINE), done.stdout[-2000:]
