"""HG-DPO's experiment files (conf/experiment/hg_dpo_*.yaml) and its pool builder alias (``python -m alignment.build
hg_dpo``): every file composes and passes the checks that build nothing, with the paper's settings; each study
differs from hg_dpo_sd15 in exactly the keys its paper row changes; the alias composes with HG-DPO's pool defaults,
keys the same file the main experiment trains on, and fails in one line, before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from alignment.cli import CONF_DIR
from tests.conftest import REPO, run_cli

# file -> the keys it changes against hg_dpo_sd15 (the paper's row), {dotted key: value}
STUDIES = {
    "hg_dpo_sd15": {},                                                                   # N-20-SML (HG-DPO)
    "hg_dpo_n2": {"method.lambda_stat": 0, "dataset.generate.num_images": 2},           # Table 3 N-2
    "hg_dpo_n5": {"method.lambda_stat": 0, "dataset.generate.num_images": 5},           # Table 3 N-5
    "hg_dpo_n10": {"method.lambda_stat": 0, "dataset.generate.num_images": 10},         # Table 3 N-10
    "hg_dpo_no_stat": {"method.lambda_stat": 0},                                        # Table 3 N-20
    "hg_dpo_loser_rank": {"method.lambda_stat": 0, "dataset.generate.loser_rank": 1},   # Table 5 N-20-L-2
    "hg_dpo_beta_x4": {"method.lambda_stat": 0, "method.beta": 20000},                  # Table 1 β × 4
    "hg_dpo_beta_x20": {"method.lambda_stat": 0, "method.beta": 100000},                # Table 1 β × 20
}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("A man in a black suit is walking on the dark street\nA woman singing on the stage\n")
    return path


def compose_run(experiment: str, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[f"experiment={experiment}", "output_dir=unused", *overrides])


def flat(node, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_every_hg_dpo_experiment_file_is_listed():
    assert sorted(p.stem for p in (REPO / "conf/experiment").glob("hg_dpo_*.yaml")) == sorted(STUDIES)


@pytest.mark.parametrize("experiment", sorted(STUDIES))
def test_experiment_files_compose_and_pass_the_checks_that_build_nothing(experiment, prompt_file):
    from alignment.builders.pools import PoolBuilder
    from alignment.data.component import check_objective_fits
    from alignment.objectives.compose import build_objective
    from alignment.objectives.hg_dpo import HGDPO
    from alignment.training.recipe import make_builder, wanted_scorers
    from alignment.training.reference import check_reference
    from alignment.training.schema import check_run_config

    cfg = compose_run(experiment, f"dataset.generate.prompts={prompt_file}")
    check_run_config(cfg)
    objective = build_objective(cfg.method, cfg.get("terms"))
    assert isinstance(objective, HGDPO)
    check_reference(cfg.method.reference, cfg.method.finetune)
    check_objective_fits(objective, cfg.dataset)
    wanted_scorers(objective, cfg)
    builder = make_builder(cfg)                       # the pool builder, settings checked, no model
    assert isinstance(builder, PoolBuilder) and builder.num_items() == 2

    changed = STUDIES[experiment]
    # the paper's shared settings [§4, App. D.2, D.4]
    assert cfg.backbone.name == "sd15" and list(cfg.scorers) == ["pickscore"] and cfg.dataset.name == "pools"
    assert cfg.method.lora.rank == 8 and cfg.method.lora.alpha == 8
    assert cfg.method.optimizer.name == "adamw8bit" and cfg.method.optimizer.lr == 1e-5
    assert cfg.dataset.batch_size * cfg.trainer.accumulate_grad_batches * cfg.trainer.devices == 16
    assert cfg.trainer.precision == "bf16-mixed"
    assert (builder.pairing, builder.rank_by, builder.sampler) == ("ranked", "pickscore", "dpmsolver")
    assert (builder.num_inference_steps, builder.guidance_scale) == (50, 5.0)
    assert builder.max_prompts == 100000
    # this file's row
    assert objective.beta == changed.get("method.beta", 5000)
    assert objective.lambda_stat == changed.get("method.lambda_stat", 10000)
    assert builder.num_images == changed.get("dataset.generate.num_images", 20)
    assert builder.loser_rank == changed.get("dataset.generate.loser_rank", builder.num_images - 1)


@pytest.mark.parametrize("experiment", sorted(set(STUDIES) - {"hg_dpo_sd15"}))
def test_each_study_changes_only_its_own_keys(experiment, prompt_file):
    from alignment.training.recipe import make_builder

    base = compose_run("hg_dpo_sd15", f"dataset.generate.prompts={prompt_file}")
    study = compose_run(experiment, f"dataset.generate.prompts={prompt_file}")
    a, b = (flat(OmegaConf.to_container(c, resolve=False)) for c in (base, study))   # as written
    assert set(a) == set(b)
    assert {key: b[key] for key in a if a[key] != b[key]} == STUDIES[experiment]
    # a study that keeps the pool settings trains on the main experiment's pool file (the same key fields)
    same_pools = not any(key.startswith("dataset.generate.") for key in STUDIES[experiment])
    assert (make_builder(base).key_fields() == make_builder(study).key_fields()) == same_pools


def test_command_line_overrides_win_over_the_experiment(prompt_file):
    cfg = compose_run("hg_dpo_n2", "backbone=toy", "scorers=toy_colour", "dataset.generate.rank_by=toy_colour",
                      "dataset.generate.num_images=4", "method.lambda_stat=5")
    assert cfg.backbone.name == "toy" and list(cfg.scorers) == ["toy_colour"]
    assert cfg.dataset.generate.num_images == 4 and cfg.method.lambda_stat == 5


def test_the_config_alone_names_an_unconfigured_rank_by(prompt_file):
    """check_scorer_config, from the composed config and the built (model-free) pool builder."""
    from alignment.builders.runner import check_scorer_config
    from alignment.errors import ConfigError
    from alignment.training.recipe import make_builder

    cfg = compose_run("hg_dpo_sd15", f"dataset.generate.prompts={prompt_file}", "scorers=toy_colour")
    builder = make_builder(cfg)
    with pytest.raises(ConfigError, match=r"^scorers: dataset\.generate\.rank_by is 'pickscore', which is not a "
                                          r"configured scorer \(add it: scorers=\[pickscore\]; configured: "
                                          r"toy_colour\)$"):
        check_scorer_config(builder, cfg.scorers, cfg.backbone.resolution)
    cfg = compose_run("hg_dpo_sd15", f"dataset.generate.prompts={prompt_file}")
    check_scorer_config(make_builder(cfg), cfg.scorers, cfg.backbone.resolution)   # PickScore: any resolution


def test_cfg_job_prints_the_composed_study():
    proc = run_cli("alignment.run", "experiment=hg_dpo_n2", "--cfg", "job", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.dataset.generate.num_images == 2 and cfg.method.lambda_stat == 0 and cfg.method.beta == 5000
    assert cfg.dataset.generate.sampler == "dpmsolver" and cfg.backbone.name == "sd15"


# ------------------------------------------------------------------------------------ python -m alignment.build hg_dpo
def compose_build(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="build", overrides=["builder=hg_dpo", *overrides])


def test_builder_alias_composes_with_hg_dpo_pool_defaults(prompt_file):
    from alignment.config import instantiate_checked
    from alignment.training.recipe import make_builder

    cfg = compose_build()
    assert cfg.builder._target_ == "alignment.builders.pools.PoolBuilder"
    expected = {"pairing": "ranked", "num_images": 20, "rank_by": "pickscore", "loser_rank": None,
                "sampler": "dpmsolver", "num_inference_steps": 50, "guidance_scale": 5.0}
    assert {key: cfg.builder[key] for key in expected} == expected
    assert list(cfg.scorers) == ["pickscore"] and cfg.backbone.name == "sd15"
    # the command line replaces the alias's scorer and backbone defaults
    toy = compose_build("scorers=[toy_colour,toy_shape]", "backbone=toy")
    assert list(toy.scorers) == ["toy_colour", "toy_shape"] and toy.backbone.name == "toy"
    # the same pool file experiment=hg_dpo_sd15 trains on (ahead of training, with out=<its dataset.source>)
    cfg.builder.prompts, cfg.builder.max_prompts = str(prompt_file), 100000
    alias = instantiate_checked(cfg.builder, "builder")
    experiment = make_builder(compose_run("hg_dpo_sd15", f"dataset.generate.prompts={prompt_file}"))
    assert alias.key_fields() == experiment.key_fields() and alias.name == experiment.name


def test_builder_alias_without_prompts_is_one_line_before_any_model(tmp_path):
    # backbone sd15 from the hub cannot load offline: reaching the model would be another error
    proc = run_cli("alignment.build", "hg_dpo", f"out={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: builder.prompts: set the prompt file to sample pools for")
    assert not list(tmp_path.glob("pools-*"))


# ------------------------------------------------------------------------------------------------ toy world
def test_toy_caption_files_are_the_fixed_split():
    """alignment/toy/captions/*.txt (what toy configs point at with ${package_file:...}) are exactly the train /
    held-out split of alignment.toy.pairs; train_x2 lists the training captions twice (two pools per caption)."""
    from alignment import PACKAGE_DIR
    from alignment.toy.pairs import split_captions

    train, heldout = split_captions()
    folder = PACKAGE_DIR / "toy" / "captions"
    assert (folder / "train.txt").read_text().splitlines() == train
    assert (folder / "heldout.txt").read_text().splitlines() == heldout
    assert (folder / "train_x2.txt").read_text().splitlines() == train + train
    assert not set(train) & set(heldout)


def test_toy_hg_dpo_composes_from_any_folder_and_passes_the_checks_that_build_nothing(tmp_path, monkeypatch):
    from alignment import PACKAGE_DIR
    from alignment.builders.pools import PoolBuilder
    from alignment.objectives.compose import build_objective
    from alignment.objectives.hg_dpo import HGDPO
    from alignment.training.recipe import make_builder
    from alignment.training.schema import check_run_config

    monkeypatch.chdir(tmp_path)   # the prompt file is found through the package, not the working directory
    cfg = compose_run("toy_hg_dpo")
    check_run_config(cfg)
    assert isinstance(build_objective(cfg.method, cfg.get("terms")), HGDPO)
    builder = make_builder(cfg)
    assert isinstance(builder, PoolBuilder) and builder.num_items() == 112
    assert cfg.dataset.generate.prompts == str(PACKAGE_DIR / "toy" / "captions" / "train_x2.txt")
    assert (builder.rank_by, builder.num_images, builder.sampler) == ("toy_preference", 20, "dpmsolver")
    assert cfg.method.inference.lora_scale == 1.0


def test_package_file_names_a_missing_file_in_one_line():
    from alignment import package_file
    from alignment.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^package_file: 'toy/captions/nope\.txt' is not a file of the alignment "
                                          r"package \(.*\)$"):
        package_file("toy/captions/nope.txt")
