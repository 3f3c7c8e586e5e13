# The two commands of the README: `make demo` and `make test`. Both create the
# virtual environment and install jclip (with its test extra) when needed.
#
# `make test` also needs the torch extra (PyTorch, open_clip) for the OpenCLIP parity
# tests, and stops with an error when it does not install or import.
# `make test WITHOUT_TORCH=1` runs the suite without it: those tests are skipped, and
# pytest's last lines say how many. PYTEST_ARGS replaces pytest's arguments, e.g.
# `make test PYTEST_ARGS="-q tests/test_convert.py"`.
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= runs/shapes_tiny
# Two workers (pytest-xdist): one compiles while the other computes.
PYTEST_ARGS ?= -q -n 2
INSTALLED := $(VENV)/.installed
WITH_TORCH := $(VENV)/.installed-torch

.PHONY: demo test clean

$(INSTALLED): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $@

$(WITH_TORCH): $(INSTALLED)
	$(VENV)/bin/python -m pip install --quiet -e ".[test,torch]" \
		|| { echo "error: the torch extra did not install; 'make test WITHOUT_TORCH=1' runs the tests without it" >&2; exit 1; }
	touch $@

demo: $(INSTALLED)
	$(VENV)/bin/python -m jclip.train --config configs/shapes_tiny.py --workdir $(WORKDIR)

ifeq ($(WITHOUT_TORCH),1)
test: $(INSTALLED)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
else
test: $(WITH_TORCH)
	$(VENV)/bin/python -c "from jclip.convert.torch_import import import_open_clip; import_open_clip()" \
		|| { echo "error: the torch extra does not import; 'make test WITHOUT_TORCH=1' runs the tests without it" >&2; exit 1; }
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
endif

clean:
	rm -rf $(WORKDIR)
