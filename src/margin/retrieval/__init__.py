"""The retriever p_eta(z|x) and its non-parametric memory (Sec. 2.2, Sec. 3).

Bottom to top: ``passages`` (corpora cut into passages), ``store`` (the memory-mapped passage
store), ``encoders`` (question and passage encoders), ``index`` and ``bm25`` (search structures),
``build`` (the index directory: write, resume, append) and ``reader`` (open and verify it),
``retriever`` (questions in, top-k passages and their vectors out), and ``sharded`` /
``distributed`` (the same over Ray).
"""
