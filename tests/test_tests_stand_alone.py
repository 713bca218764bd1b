"""Every test file stands alone: none imports another test module or conftest.py.

So any one of them can be read and run by itself (``pytest tests/test_X.py``). What several files
share lives in tests/helpers.py (and tests/_tiny_rag.py); shared fixtures are in tests/conftest.py,
which pytest supplies without an import.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
# an import line naming a test module or conftest, also inside a script string run in a subprocess
_TEST_MODULE_IMPORT = re.compile(r"^[ \t]*(?:from|import)[ \t]+(?:conftest|test_\w+)\b", re.M)


def imports_of_test_modules(source: str) -> list[str]:
    """The lines of ``source`` that import a test module or conftest."""
    return [m.group(0).strip() for m in _TEST_MODULE_IMPORT.finditer(source)]


def test_the_check_sees_every_form_of_the_import():
    source = (
        "from test_server import build_world\n"
        "import test_generator\n"
        "def f():\n"
        "    from conftest import KeywordEncoder\n"
        'SCRIPT = """\nfrom test_build import TableEncoder\n"""\n'
        "from helpers import KeywordEncoder\n"
        "from margin.training.test_config import x\n"
        "# see test_generator for the model\n"
    )
    assert imports_of_test_modules(source) == [
        "from test_server",
        "import test_generator",
        "from conftest",
        "from test_build",
    ]


@pytest.mark.parametrize("path", sorted(TESTS.glob("*.py")), ids=lambda p: p.name)
def test_no_test_file_imports_another_test_module(path):
    assert imports_of_test_modules(path.read_text(encoding="utf-8")) == []
