# livestain: `make demo` runs the whole loop on the simulated microscope,
# `make test` runs the test suite. Each sets up its own virtual environment first.
VENV ?= .venv
PYTHON ?= python3
# the CPU build of torch where available (a CUDA build is several GB); override for GPUs
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test setup clean

demo: $(VENV)/.installed
	$(BIN)/livestain demo $(ARGS)

test: $(VENV)/.installed
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest $(PYTEST_ARGS)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,export,batch]"
	# real transmitted-light + Hoechst test images (BSD-3); --no-deps: its extras are not needed
	$(BIN)/python -m pip install --quiet --no-deps ndev-sampledata
	touch $@

clean:
	rm -rf $(VENV) livestain-demo
