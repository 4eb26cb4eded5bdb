# Two commands on a fresh machine:  make demo   |   make test
# Each installs what it needs first into .venv: torch (TORCH_SPEC, default the CPU build 2.13.0) BEFORE everything
# else, then the project with a constraints file pinning that torch, so no dependency can pull another torch.
# GPU users: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo demo-tiny test test-fast bench bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip freeze | grep -i '^torch==' > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[test,slurm]"
	$(PY) -m alignment.backbones.clip_vocab >/dev/null   # CLIP BPE vocabulary for the offline tiny backbone
	touch $(STAMP)

demo: install   # toy world: Diffusion-DPO on CPU, then the win rate of the aligned model over the base (~3 min)
	$(PY) -m alignment.toy.demo

demo-tiny: install   # the 15-second smoke run: 30 DPO steps on the tiny random backbone and synthetic pairs
	$(PY) -m alignment.run experiment=demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install   # CPU benchmarks: framework overhead, latent-cache speed-up, DPO/SFT memory; model FLOPs per pair
	$(PY) experiments/bench_dpo.py cpu
	$(PY) experiments/bench_dpo.py flops
	$(PY) experiments/bench_grad_sampler.py   # gradient sampler: memory of a DRaFT step vs sampling steps, K
	$(PY) experiments/bench_dpo.py reference  # snapshot reference vs adapters disabled: peak memory
	$(PY) experiments/bench_pools.py cpu --threads 1   # pool builder vs stock StableDiffusionPipeline: images/s

bench-gpu: install   # on a GPU machine: pairs/s and MFU of LoRA-DPO for SD 1.5 @512 and SDXL @1024, per switch
	$(PY) experiments/bench_dpo.py gpu
	$(PY) experiments/bench_pools.py gpu   # pool builder vs stock pipeline, SD 1.5 arch @512, batch 8, 50 steps
	$(PY) experiments/bench_grad_sampler.py gpu   # DRaFT-1/2 step, SD 1.5 arch @512: peak memory vs 24 GiB

clean:
	rm -rf outputs multirun data/generated .pytest_cache
