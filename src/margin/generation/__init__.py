"""The generator p_theta(y_i|x,z,y_<i) (Sec. 2.3) and the decoding procedures (Sec. 2.5).

``generator`` is the one interface the RAG model talks to; ``seq2seq`` (BART, the paper's) and
``causal`` (decoder-only models such as the default SmolLM2) implement it, with ``prompting``
(how a question and a passage become a causal prompt) and ``kv_cache`` (the KV caches they keep:
causal prompts with their shared prefix run once, the seq2seq decoder-start step).
``decoding`` searches the marginal: RAG-Token beam search, Thorough and Fast Decoding.
``default_generator`` converts the default model from its PyPI package once.
"""
