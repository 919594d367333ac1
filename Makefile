# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtual environment $(VENV) and install what they need.

PYTHON ?= python3
VENV ?= .venv
DATA ?= ../shared/data/mini_uned
OUT ?= outputs/demo

VENV_PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Recipes read DATA and OUT from the environment ("$$OUT"), so paths with spaces or quotes stay one word.
export DATA OUT

.PHONY: demo test venv clean-demo

venv: $(STAMP)

# Reinstall only when a requirements file changes. Offline, the pip upgrade fails but requirements
# that are already installed still resolve, so only a missing package stops the install.
# A venv that `python3 -m venv` left without pip (Debian's python3 lacks ensurepip until
# python3-venv is installed) gets venv run over it again, which installs pip and keeps the
# installed packages.
$(STAMP): requirements.txt requirements-dev.txt
	$(VENV_PYTHON) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --quiet --upgrade pip || echo "could not upgrade pip (offline?); installing with the current pip"
	$(VENV_PYTHON) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

# GNU make (4.3) sends its SIGTERM to the recipe's /bin/sh, which does not pass it on, so exec
# replaces that shell with the demo, which stops its running step.
demo: $(STAMP)
	exec env PYTHON=$(VENV_PYTHON) bash misc/run_demo.sh

test: $(STAMP)
	$(VENV_PYTHON) -m pytest -q

clean-demo:
	rm -rf -- "$$OUT"
