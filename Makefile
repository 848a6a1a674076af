# `make demo` (prepare, train or resume, chat) and `make test` (the suite CI runs); `make lint` (ruff, ruff.toml) and
# `make targets` (cross-compile every kernel for sm_75/80/90, no GPU needed); `make gpu-check OUT=DIR` on a GPU machine.
# Both use the active virtual environment, or create .venv when none is active.
PYTHON ?= python3
ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
else
PY := $(CURDIR)/.venv/bin/python
endif
DATA ?= data/guppy
RUN ?= runs/demo
PYTEST_ARGS ?=
# Test files run in parallel, one worker per core (pytest-xdist), a whole file per worker: the files' module fixtures
# (a tiny trained run, a prepared dataset) are built once, and the suite's CPU time (~30 min) is shared by the cores.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= auto
ARCH ?= 75,80,90

.PHONY: demo demo-train test lint targets install venv bench-step gpu-check clean

venv:
	@test -x "$(PY)" || $(PYTHON) -m venv .venv

install: venv
	$(PY) -m pip install -q -e .

demo: demo-train
	$(PY) -m guppy chat --checkpoint $(RUN) --seed 0 \
		--prompt "hi guppy" --prompt "what do you like to eat?" --prompt "are you lonely?" \
		--prompt "what is the meaning of life?"
ifndef VIRTUAL_ENV
	@echo "to use guppy in this shell: source .venv/bin/activate"
endif

# The data once, then the run: trained (guppy train picks cpu-demo without CUDA, guppy-9m with it), resumed where a
# Ctrl-C stopped it, or left as it is once finished (`python -m guppy.runstate` says which).
demo-train: install
	@test -f $(DATA)/meta.json || $(PY) -m guppy prepare --out $(DATA)
	@state=$$($(PY) -m guppy.runstate $(RUN)); case "$$state" in \
	none) $(PY) -m guppy train --data $(DATA) --out $(RUN) ;; \
	finished*) echo "$(RUN) already trained ($$state); chatting with it (remove it to retrain)" ;; \
	*) echo "$(RUN): $$state; resuming it"; $(PY) -m guppy train --data $(DATA) --out $(RUN) --resume ;; \
	esac

test: venv
	$(PY) -m pip install -q -e ".[test]"
	@$(PY) -m pytest tests -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS); \
	rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests, which counts as a failure"; exit 1; fi; \
	exit $$rc

lint: venv
	$(PY) -m pip install -q "ruff==0.17.5"
	$(PY) -m ruff check .

targets: install
	$(PY) -m guppy targets --arch $(ARCH)

# One prepared GPU check (bench/gpu_check.py), OUT=DIR for its files. It runs on the machine's own Python (a GPU
# machine has torch preinstalled; no venv is made) and installs guppy itself when it is not importable.
gpu-check:
	@py="$(PY)"; [ -x "$$py" ] || py=$(PYTHON); \
	$$py -m bench gpu-check $(if $(OUT),--out "$(OUT)") $(GPU_CHECK_ARGS)

bench-step: install
	$(PY) -m bench step

clean:
	rm -rf build dist *.egg-info .pytest_cache
