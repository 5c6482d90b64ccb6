import importlib.metadata
import re
from pathlib import Path

import attnpatch


def test_version_matches_installed_metadata():
    assert attnpatch.__version__ == importlib.metadata.version("attnpatch")


def test_changelog_names_the_current_version_first():
    changelog = (Path(__file__).parent.parent / "CHANGELOG.md").read_text()
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", changelog, flags=re.M)
    assert released and released[0] == attnpatch.__version__
