# Two entry points for a fresh machine: `make demo` (whole pipeline on the embedded synthetic
# set, or on $HAM10000_DIR when set, ending with a TorchServe round trip) and `make test`. Both
# create and fill .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# The SageMaker SDK and AWS's inference toolkit (~1.2 GB): for `make test` and the SageMaker scripts only.
INSTALLED_SAGEMAKER := $(VENV)/.installed-sagemaker
# What the SageMaker model archive's code/requirements.txt installs in AWS's inference container, for the
# toolkit tests to install as that container does (tests/aws_local.py).
INFERENCE_WHEELS := $(VENV)/inference-wheels
# The KServe SDK in a venv of its own (it pins psutil and pandas below .venv's): the KServe tests' client.
VENV_KSERVE := .venv-kserve
INSTALLED_KSERVE := $(VENV_KSERVE)/.installed

# The demo's data: the real HAM10000 folder when HAM10000_DIR is set, else the synthetic set.
DATASET_DIR := $(if $(HAM10000_DIR),$(HAM10000_DIR),data/synthetic)
DATALIST := data/datalist.json
DEMO_EPOCHS ?= 5
BUNDLE_RUN := $(PY) -m monai.bundle run --dataset_dir "$(DATASET_DIR)" --datalist $(DATALIST)
SERVE_RUN_DIR := runs/serve
SERVE_DEMO_IMAGES ?= 3

.PHONY: venv venv-sagemaker venv-kserve demo data train evaluate package release serve-demo test lint clean

venv: $(INSTALLED)

# The pinned environment plus this project, editable: bundle, handler and cloud import from the checkout.
$(INSTALLED): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt -e .
	touch $@

venv-sagemaker: $(INSTALLED_SAGEMAKER)

$(INSTALLED_SAGEMAKER): $(INSTALLED) requirements-sagemaker.txt cloud/inference_requirements.txt
	$(VENV)/bin/pip install --quiet -r requirements-sagemaker.txt
	$(VENV)/bin/pip download --quiet --no-deps --dest $(INFERENCE_WHEELS) -r cloud/inference_requirements.txt
	touch $@

venv-kserve: $(INSTALLED_KSERVE)

$(INSTALLED_KSERVE): requirements-kserve.txt
	$(PYTHON) -m venv $(VENV_KSERVE)
	$(VENV_KSERVE)/bin/pip install --quiet --upgrade pip
	$(VENV_KSERVE)/bin/pip install --quiet -r requirements-kserve.txt
	touch $@

data: venv
ifndef HAM10000_DIR
	$(PY) scripts/make_synthetic.py --output_dir data/synthetic
endif
	$(PY) scripts/prepare_data.py --dataset_dir "$(DATASET_DIR)" --output $(DATALIST)

train: data
	$(BUNDLE_RUN) --config_file configs/train.json --max_epochs $(DEMO_EPOCHS) --resume false

evaluate: venv
	$(BUNDLE_RUN) --config_file "['configs/train.json','configs/evaluate.json']"
	$(PY) scripts/show_metrics.py eval/metrics.json

# Package the trained model, serve it with TorchServe, classify a few images over REST, stop the server
# (also when classifying fails).
package: venv
	$(PY) scripts/package_mar.py

# The MONAI model-zoo release of the trained bundle: dist/<name>_v<version>.zip (scripts/release_bundle.py).
# RELEASE_FILES_URL: where the files of models/ are also published, for the zip's large_files.yml.
release: venv
	$(PY) scripts/release_bundle.py --output_dir dist $(if $(RELEASE_FILES_URL),--files_url $(RELEASE_FILES_URL))

serve-demo: package
	$(PY) scripts/serve.py start --run_dir $(SERVE_RUN_DIR)
	find -L "$(DATASET_DIR)/" -iname '*.jpg' ! -name '.*' ! -path '*/__MACOSX/*' -print0 | sort -z \
		| head -z -n $(SERVE_DEMO_IMAGES) | xargs -0 $(PY) scripts/predict.py --run_dir $(SERVE_RUN_DIR); \
		status=$$?; $(PY) scripts/serve.py stop --run_dir $(SERVE_RUN_DIR); exit $$status

demo: train evaluate serve-demo

test: venv venv-sagemaker venv-kserve
	$(VENV)/bin/pytest -q tests

# The style pyproject.toml configures (ruff: lint rules and formatting); CI checks it before the tests.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf models eval cache data/synthetic $(DATALIST) dist $(SERVE_RUN_DIR)
