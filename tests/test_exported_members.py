"""The public surface is what we meant it to be."""

import margin

EXPECTED = {
    "RAG", "Answer", "Provenance", "Retriever", "Retrieved", "Encoder", "load_encoder",
    "build_index", "open_index", "DenseIndex", "IndexConfig", "BM25Index", "PassageStore",
    "Passage", "read_corpus", "DecodeConfig", "MarginError", "__version__",
}


def test_public_surface_is_exactly_what_we_meant():
    assert set(margin.__all__) == EXPECTED


def test_all_names_resolve():
    for name in margin.__all__:
        assert getattr(margin, name) is not None, name


def test_the_documented_entry_point_is_a_classmethod():
    assert callable(margin.RAG.load)


def test_every_public_name_has_a_lazy_home():
    assert set(margin._EXPORTS) | {"__version__"} == set(margin.__all__)
    assert set(margin.__all__) <= set(dir(margin))


def test_an_unknown_name_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no_such_thing"):
        margin.no_such_thing  # noqa: B018


def test_importing_the_package_and_its_cli_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, margin, margin.cli; print('torch' in sys.modules, 'faiss' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
