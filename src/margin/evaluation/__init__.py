"""The paper's tasks: reading their data (``examples``), their metrics (``metrics``) and the
evaluation grid over retrievers, modes and k: what it is (``grid``), running and resuming its runs
(``runs``), their scores and reports (``report``), and the harness over them (``evaluate``)."""
