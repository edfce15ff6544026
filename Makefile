# Two commands set everything up on a fresh machine (demo installs the digits data set's scikit-learn,
# eval's matplotlib and serve's FastAPI + uvicorn too, so every command of the README runs after it):
#   make demo   - draws "a red circle to the left of a blue square" with the embedded default
#                 text-to-image model -> demo.png
#   make test   - installs the test oracles (and Debian's chromium for the browser tests) and runs the whole suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Pin torch before anything else so no package pulls a CUDA build onto a CPU machine.
TORCH  ?= torch==2.13.0

.PHONY: demo test venv dev clean chromium

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[digits,eval,serve]"
	touch $@

$(VENV)/.dev: $(VENV)/.base pyproject.toml
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[dev]"
	touch $@

venv: $(VENV)/.base
dev: $(VENV)/.dev

demo: $(VENV)/.base
	$(VENV)/bin/unfog generate "a red circle to the left of a blue square" --seed 0 --output demo.png --overwrite

test: $(VENV)/.dev chromium
	$(PY) -m pytest -q

# The browser tests drive Debian's Chromium (through Playwright, a dev dependency): install it if missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }

clean:
	rm -rf $(VENV) demo.png
