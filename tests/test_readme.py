"""Every code block of README.md runs, or says why it does not.

```python blocks run each in a fresh interpreter; ```bash blocks run with bash -e
from a scratch directory. A block preceded by ``<!-- not-run: reason -->`` is
skipped with that reason; any other language, or an unmarked block of one, fails.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
BLOCK = re.compile(r"(?:<!--\s*not-run:\s*(?P<reason>.*?)\s*-->\s*\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)


def blocks():
    text = README.read_text()
    found = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code"))
        found.append(
            pytest.param(match["lang"], match["code"], match["reason"], id=f"README.md:{line}-{match['lang']}")
        )
    return found


def environment():
    env = {k: v for k, v in os.environ.items() if k != "ATTNPATCH"}
    # `python` and `attnpatch` in the blocks are the ones of this interpreter.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def test_readme_has_code_blocks_of_each_kind():
    langs = [p.values[0] for p in blocks()]
    assert langs.count("python") >= 3 and "bash" in langs


@pytest.mark.parametrize("lang,code,reason", blocks())
def test_readme_block(lang, code, reason, tmp_path):
    if reason:
        pytest.skip(f"not run: {reason}")
    if lang == "python":
        command = [sys.executable, "-c", code]
    elif lang in ("bash", "console"):
        command = ["bash", "-e", "-c", code]
    else:
        pytest.fail(f"a ```{lang or '(no language)'} block must run or carry <!-- not-run: reason -->")
    result = subprocess.run(command, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
