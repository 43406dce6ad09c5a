# Two entry points for a fresh machine: `make demo` (whole pipeline on the embedded synthetic
# set, or on $HAM10000_DIR when set) and `make test`. Both create and fill .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

# The demo's data: the real HAM10000 folder when HAM10000_DIR is set, else the synthetic set.
DATASET_DIR := $(if $(HAM10000_DIR),$(HAM10000_DIR),data/synthetic)
DATALIST := data/datalist.json
DEMO_EPOCHS ?= 5
BUNDLE_RUN := $(PY) -m monai.bundle run --dataset_dir $(DATASET_DIR) --datalist $(DATALIST)

.PHONY: venv demo data train evaluate test clean

venv: $(INSTALLED)

$(INSTALLED): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

data: venv
ifndef HAM10000_DIR
	$(PY) scripts/make_synthetic.py --output_dir data/synthetic
endif
	$(PY) scripts/prepare_data.py --dataset_dir $(DATASET_DIR) --output $(DATALIST)

train: data
	$(BUNDLE_RUN) --config_file configs/train.json --max_epochs $(DEMO_EPOCHS) --resume false

evaluate: venv
	$(BUNDLE_RUN) --config_file "['configs/train.json','configs/evaluate.json']"
	$(PY) scripts/show_metrics.py eval/metrics.json

demo: train evaluate

test: venv
	$(VENV)/bin/pytest -q tests

clean:
	rm -rf models eval data/synthetic $(DATALIST)
