"""The paper's tasks: reading their data (``examples``), their metrics (``metrics``) and the
evaluation grid over retrievers, modes and k (``evaluate``)."""
