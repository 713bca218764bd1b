"""``margin serve``: RAG behind an HTTP API and a web page, with micro-batching and live index
hot-swapping."""
