# The two commands of the README: `make demo` and `make test`. Both create the
# virtual environment and install jclip (with its test extra) when needed.
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= runs/shapes_tiny
INSTALLED := $(VENV)/.installed
WITH_TORCH := $(VENV)/.installed-torch

.PHONY: demo test clean

$(INSTALLED): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $@

# The optional torch extra (PyTorch, open_clip) lets the OpenCLIP parity tests run; without it they skip.
$(WITH_TORCH): $(INSTALLED)
	$(VENV)/bin/python -m pip install --quiet -e ".[test,torch]" \
		|| echo "warning: the torch extra did not install; the OpenCLIP comparison tests will be skipped"
	touch $@

demo: $(INSTALLED)
	$(VENV)/bin/python -m jclip.train --config configs/shapes_tiny.py --workdir $(WORKDIR)

test: $(WITH_TORCH)
	$(VENV)/bin/python -m pytest -q -n 2  # two workers (pytest-xdist): one compiles while the other computes

clean:
	rm -rf $(WORKDIR)
