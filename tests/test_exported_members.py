"""The public surface is what we meant it to be."""

import margin


def test_all_names_resolve():
    for name in margin.__all__:
        assert hasattr(margin, name), name


def test_no_private_names_exported():
    assert all(not n.startswith("_") or n == "__version__" for n in margin.__all__)
