"""Every ```python block of README.md and docs/*.md runs, each on its own in a fresh process.

A block is standalone: it imports what it uses and makes its own data. A block may opt out
only with the line ``<!-- not-run: <reason> -->`` right before its opening fence (for code that
needs data or hardware the test machine lacks); the test then reports it as skipped with the
reason.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:<!-- not-run: (?P<reason>[^\n]+?) -->\n)?```python\n(?P<code>.*?)^```",
                   re.S | re.M)


def _blocks():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start("code")) + 1
            yield pytest.param(match["code"], match["reason"],
                               id=f"{path.relative_to(ROOT)}:{line}")


def test_blocks_are_found_and_every_fence_is_parsed():
    blocks = list(_blocks())
    assert len(blocks) >= 5
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        text = path.read_text()
        assert text.count("```python") == len(BLOCK.findall(text)), path


@pytest.mark.parametrize(("code", "reason"), list(_blocks()))
def test_block_runs(code, reason, tmp_path):
    if reason:
        pytest.skip(f"not-run: {reason}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
