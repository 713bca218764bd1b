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
