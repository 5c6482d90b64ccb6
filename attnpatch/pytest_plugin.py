"""pytest plugin (entry point ``pytest11``), loaded by every pytest run once attnpatch
is installed, so it does nothing unless asked, and imports neither torch nor
attnpatch's targets:

* ``pytest --attnpatch``, or ``attnpatch = true`` in the ini file: attnpatch is
  active for the whole test session;
* the ``attnpatch_scope`` fixture: active for one test (``attnpatch.patched()``).

Session activation is an open ``patched()`` scope rather than ``apply()``, so a
test that calls ``attnpatch.remove()`` (turning the process-wide switch off) does
not end it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

_session_scope = pytest.StashKey[Any]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("attnpatch").addoption(
        "--attnpatch",
        action="store_true",
        default=False,
        help="activate attnpatch (no NaN from fully masked attention rows) for the whole session",
    )
    parser.addini("attnpatch", type="bool", default=False, help="activate attnpatch for the whole session")


def _wanted(config: pytest.Config) -> bool:
    return bool(config.getoption("attnpatch") or config.getini("attnpatch"))


def pytest_configure(config: pytest.Config) -> None:
    if _wanted(config):
        import attnpatch

        config.stash[_session_scope] = attnpatch.patched().start()


def pytest_unconfigure(config: pytest.Config) -> None:
    scope = config.stash.get(_session_scope, None)
    if scope is not None:
        scope.stop()
        del config.stash[_session_scope]


def pytest_report_header(config: pytest.Config) -> str | None:
    return "attnpatch: active for this session" if _session_scope in config.stash else None


@pytest.fixture
def attnpatch_scope() -> Iterator[Any]:
    """attnpatch active for this test only (every target); yields the scope."""
    import attnpatch

    with attnpatch.patched() as scope:
        yield scope
