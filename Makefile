# The README's two commands: `make demo` and `make test`. Each creates .venv when missing,
# installs the project into it once (a stamp file records it), then runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.crdnd-ray-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# torchattacks 3.5.1 pins requests~=2.25.1, which mlflow cannot accept; its code needs nothing
	# beyond what is installed above, so it goes in without its dependency pins (see README).
	$(BIN)/python -m pip install --quiet --no-deps torchattacks==3.5.1
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/crdnd-ray sweep search_spaces/digits.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs --durations=15

clean:
	rm -rf $(VENV)
