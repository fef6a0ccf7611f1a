# Two entry points for a fresh machine (see README.md):
#   make demo   set up .venv and run the whole pipeline on the embedded demo
#   make test   set up .venv and run the test suite
# On a cluster, install into your own environment instead (pip install -e '.[workflow]')
# so that pip picks the CUDA build of torch that your site provides.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU wheel of torch for machines without a GPU; timm needs torchvision, whose release must match torch.
TORCH_SPEC ?= torch==2.13.0 torchvision==0.28.0
CORES  ?= 2

.PHONY: setup system-deps demo test lint

# Debian's python3 lacks venv without the python3.X-venv package, and a failed `-m venv` leaves a
# .venv without pip behind: remove it, install the package when we are root, else say which.
VENV_PKG = $$($(PYTHON) -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])')
# Snakemake starts step scripts with the venv's python path unquoted (snakemake/snakemake#2645):
# a venv at a path with a space or a character that ends or expands a shell word would fail
# every step, after minutes of installing (workflow/rules/common.smk, check_python_path): stop
# first. Read with make's functions, so that no shell meets the path.
lp := (
rp := )
VENV_UNSAFE = $(or $(word 2,$(abspath $(VENV))),$(strip $(foreach c,' " \ $$ ` ; & | < > $(lp) $(rp),$(findstring $(c),$(abspath $(VENV))))))
$(BIN)/python:
	$(if $(VENV_UNSAFE),$(error the environment's path $(abspath $(VENV)) has a space or shell character, and Snakemake cannot start a Python there (snakemake/snakemake#2645): give it another place, e.g. make $(or $(MAKECMDGOALS),demo) VENV=$$HOME/.venvs/xmodal (the project folder itself may have spaces)))
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  echo "installing $(VENV_PKG) (python -m venv needs it)" && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(VENV_PKG) >/dev/null && \
	  $(PYTHON) -m venv $(VENV); } || { rm -rf $(VENV); \
	  echo "could not create $(VENV) with '$(PYTHON) -m venv': install $(VENV_PKG) (Debian/Ubuntu: sudo apt-get install $(VENV_PKG)), or set PYTHON to a Python 3.11+ with venv" >&2; exit 1; }

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[workflow,test,dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --profile profiles/demo --cores $(CORES)
	mkdir -p results/report
	# written next to its place and moved there: a report that fails half-way (a full disk)
	# leaves the previous one whole
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --profile profiles/demo --report results/report/.demo.html.tmp.html
	mv -f results/report/.demo.html.tmp.html results/report/demo.html
	@echo "Demo finished: figures in results/figures/demo/, report in results/report/demo.html"
	@echo "NOTE: the demo's models are tiny and trained for a few minutes on synthetic scenes (README, 'The two commands'); its numbers say nothing about real models."
	@echo "The README's snakemake and python commands use the environment in $(VENV): run 'source $(VENV)/bin/activate' first."

# graphviz renders --dag/--rulegraph in the tests; installed when we are root and it is missing.
system-deps:
	@command -v dot >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends graphviz >/dev/null) \
	  || echo "graphviz not installed: DAG rendering tests will be skipped"; }

test: setup system-deps
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src scripts tests benchmarks
	$(BIN)/ruff format --check src scripts tests benchmarks
	$(BIN)/snakefmt --check Snakefile workflow/rules
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --lint
