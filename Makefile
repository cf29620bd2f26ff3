# Two commands do all set-up: `make demo` and `make test`. Both create .venv and install what they need
# once (the stamp file is newer than pyproject.toml afterwards, so a second run installs nothing).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo demo-full test test-fast bench repro clean students-1k browser

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	@# WordNet 3.0 (wordnet-labels stage): Debian's wordnet-base + wordnet-sense-index, only when missing
	@# and GROUNDING_WORDNET_DIR is unset (root or sudo; CI runs as root); then laid out for NLTK in .venv.
	@if [ -z "$$GROUNDING_WORDNET_DIR" ] && ! [ -f /usr/share/wordnet/data.noun -a -f /usr/share/wordnet/index.sense ]; then \
	  S=; [ "$$(id -u)" = 0 ] || S=sudo; I="$$S env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wordnet-base wordnet-sense-index"; \
	  echo "installing WordNet 3.0: apt-get install wordnet-base wordnet-sense-index"; \
	  $$I >/dev/null || { $$S apt-get update -qq && $$I >/dev/null; } || { echo "could not install WordNet 3.0: run 'sudo apt-get install wordnet-base wordnet-sense-index' or set GROUNDING_WORDNET_DIR to a WordNet 3.0 dict directory" >&2; exit 1; }; \
	fi
	$(PY) -m grounding.teachers.wordnet_db install
	touch $(STAMP)

# Headless Chromium for tests/test_report.py (the report opened in a real browser): Debian's chromium, only
# when missing (root or sudo, as for WordNet). Where it cannot be installed the test skips and says why.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || [ -n "$$GROUNDING_CHROMIUM" ] || { \
	  S=; [ "$$(id -u)" = 0 ] || S=sudo; I="$$S env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium"; \
	  echo "installing headless Chromium for the report test: apt-get install chromium"; \
	  $$I >/dev/null || { $$S apt-get update -qq && $$I >/dev/null; } || echo "could not install chromium: tests/test_report.py's browser test will skip (run 'sudo apt-get install chromium')" >&2; }

demo: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH dvc repro
	PATH=$(abspath $(VENV))/bin:$$PATH dvc metrics show
	$(VENV)/bin/grounding demo
	$(VENV)/bin/grounding shards ls data
	$(VENV)/bin/grounding report data -o report
	@echo "report: $(abspath report)/index.html (open it in a browser; it needs no server)"

# The same stages and exports at the full budget: params.yaml with params-full.yaml on top (more bootstrap,
# RefCLIP and student epochs; `python -m grounding.overlay params-full.yaml` prints the overrides), run by
# `grounding demo`, whose stage keys DVC's runs share. Its outputs go under their own dataset name
# (synthetic-full), beside make demo's. DVC users: dvc exp run $$(python -m grounding.overlay params-full.yaml --dvc).
demo-full: $(STAMP)
	$(VENV)/bin/grounding demo $$($(PY) -m grounding.overlay params-full.yaml)
	$(VENV)/bin/grounding shards ls data
	$(VENV)/bin/grounding report data -o report
	@echo "report: $(abspath report)/index.html (open it in a browser; it needs no server)"

test: $(STAMP) browser
	$(PY) -m pytest -q

test-fast: $(STAMP) browser
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(VENV)/bin/grounding run yolo-anchors --set progress=false
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) benchmarks/suite.py

repro: $(STAMP)
	$(VENV)/bin/dvc repro

# The box-regressing students on a 4x larger synthetic set (1000 images, generator seed 1; YOLO bootstrap
# 10 epochs, the same compute as 40 on 240 images), 16-px token grid, 30 epochs, the other budgets as
# make demo-full (params-full.yaml: its teachers, e.g. the 300-step CLIP bootstrap): the README "Students
# at 4x data" table. Over an hour on 2 cores (the rec-pseudo line, RefCLIP chain included, 73 min); set-up as for `make demo`.
SET_1K   = $$($(PY) -m grounding.overlay params-full.yaml) --set progress=false --set dataset.name=synthetic-1k \
           --set dataset.synthetic.n_images=1000 --set dataset.synthetic.seed=1 --set teachers.yolo.bootstrap.epochs=10
TRUNK_1K = --set students.$(1).visual_stride=16 --set students.$(1).epochs=30 --set "students.$(1).lr_drop=[27]"
students-1k: $(STAMP)
	$(VENV)/bin/grounding run student-rec-pseudo $(SET_1K) $(call TRUNK_1K,rec)
	$(VENV)/bin/grounding run student-epmvg $(SET_1K) $(call TRUNK_1K,epmvg)

clean:
	rm -rf data/prepared data/teachers data/students data/metrics models/* .pytest_cache

# Optional mmdet backend for teachers.frcnn/fcos (backend: mmdet). Not part of `make test`: mmcv 2.1.0 (the
# newest mmdet 3.3.0 accepts) has no wheel for torch 2.14; its sdist needs pkg_resources (setuptools<70),
# --no-build-isolation, wheel, and -std=c++20 instead of the c++14/17 its setup.py forces. Built here (CPU
# ops) in ~35-60 min on 2 cores; then `pytest tests/test_mmdet.py` checks the backend against mmdet itself.
.PHONY: mmdet
mmdet: $(STAMP)
	rm -rf .cache/mmcv-build && mkdir -p .cache/mmcv-build
	$(PYTHON) -m venv .cache/mmcv-build/dl && .cache/mmcv-build/dl/bin/pip install --quiet "setuptools<70" wheel
	cd .cache/mmcv-build && dl/bin/pip download --quiet --no-deps --no-binary :all: --no-build-isolation mmcv==2.1.0
	cd .cache/mmcv-build && tar xzf mmcv-2.1.0.tar.gz && sed -i 's/-std=c++1[47]/-std=c++20/g' mmcv-2.1.0/setup.py
	$(PY) -m pip install --quiet "setuptools<70" wheel ninja
	cd .cache/mmcv-build/mmcv-2.1.0 && MMCV_WITH_OPS=1 MAX_JOBS=2 $(abspath $(PY)) -m pip install --no-build-isolation .
	$(PY) -m pip install --quiet mmengine==0.10.7 mmdet==3.3.0
	$(PY) -c "import mmcv.ops, mmdet; print('mmdet', mmdet.__version__, 'mmcv', mmcv.__version__, 'with ops')"
