"""The sample-pool builder (alignment.builders.pools.PoolBuilder): ranked pools (HG-DPO) pick the best image and the
requested rank, with scores recomputable from the stored PNGs; consecutive pools (BalancedDPO) pair images 2k, 2k+1
unlabelled; seeds follow (seed, prompt, image) alone; builds are deterministic and resume; bad settings are one-line
errors naming their key; the file reads as Pick-a-Pic pairs; the configs and the CLI work on the toy backbone."""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from alignment.builders.pools import POOL_SCHEMA, PoolBuilder
from alignment.builders.runner import build, build_table
from alignment.errors import ConfigError, DataError
from alignment.seeding import derive_seed
from alignment.toy.scorers import ToyColour
from tests.conftest import REPO, run_cli

PROMPTS = ["a blue circle", "a purple square", "a green triangle"]
N = 4
FAST = {"num_images": N, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def toy_backbone():
    from alignment.toy.backbone import build_toy_backbone

    return build_toy_backbone()


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def scorers():
    return {"toy_colour": ToyColour().freeze()}


@pytest.fixture(scope="module")
def ranked_file(tmp_path_factory, toy_backbone, prompt_file, scorers):
    builder = PoolBuilder(prompt_file, rank_by="toy_colour", **FAST)
    result = build(builder, tmp_path_factory.mktemp("ranked"), toy_backbone, scorers, shard=(0, 1), progress=False)
    assert result.complete and result.rows == len(PROMPTS)
    return result.path


def decode(blob: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(blob)).convert("RGB"))).permute(2, 0, 1).float() / 255


def test_ranked_pairs_the_best_with_the_worst_on_the_stored_pixels(ranked_file, scorers):
    table = pq.read_table(ranked_file)
    assert table.schema.equals(POOL_SCHEMA)
    for i, row in enumerate(table.to_pylist()):
        assert row["caption"] == PROMPTS[i] and row["prompt_index"] == i and row["label_0"] == 1.0
        assert row["pool_seeds"] == [derive_seed(0, i, j) for j in range(N)]
        scores = row["pool_scores"]
        assert len(scores) == N
        best, worst = int(np.argmax(scores)), int(np.argmin(scores))
        assert (row["seed_0"], row["score_0"]) == (row["pool_seeds"][best], max(scores))
        assert (row["seed_1"], row["score_1"]) == (row["pool_seeds"][worst], min(scores))  # loser_rank default: N-1
        assert row["score_0"] > row["score_1"]
        # the stored scores are the scorer's on the stored 8-bit pixels
        recomputed = scorers["toy_colour"](torch.stack([decode(row["jpg_0"]), decode(row["jpg_1"])]),
                                           [row["caption"]] * 2).double().tolist()
        assert recomputed == pytest.approx([row["score_0"], row["score_1"]], abs=1e-6)


def test_loser_rank_picks_that_rank_and_defaults_to_the_worst(ranked_file, toy_backbone, prompt_file, scorers):
    default = PoolBuilder(prompt_file, rank_by="toy_colour", **FAST)
    assert default.loser_rank == N - 1
    assert default.key_fields() == PoolBuilder(prompt_file, rank_by="toy_colour", loser_rank=N - 1, **FAST).key_fields()
    second = build_table(PoolBuilder(prompt_file, rank_by="toy_colour", loser_rank=1, **FAST), toy_backbone, scorers)
    reference = pq.read_table(ranked_file)
    assert second.column("pool_scores").equals(reference.column("pool_scores"))  # the same pools
    assert second.column("jpg_0").equals(reference.column("jpg_0"))  # the same winners
    for row in second.to_pylist():
        order = sorted(range(N), key=lambda j: -row["pool_scores"][j])
        assert row["seed_1"] == row["pool_seeds"][order[1]] and row["score_1"] == sorted(row["pool_scores"])[-2]


class ConstantScorer:
    """Every image scores the same: the ranking must fall back to image order."""

    def __call__(self, images, prompts):
        return torch.zeros(images.shape[0])


def test_equal_scores_keep_image_order(toy_backbone, prompt_file):
    table = build_table(PoolBuilder(prompt_file, rank_by="flat", **FAST), toy_backbone, {"flat": ConstantScorer()})
    for row in table.to_pylist():
        assert row["seed_0"] == row["pool_seeds"][0] and row["seed_1"] == row["pool_seeds"][N - 1]


def test_consecutive_pairs_are_unlabelled_and_read_as_pick_a_pic(tmp_path, toy_backbone, prompt_file, capfd):
    from alignment.data.pickapic import PreferencePairs

    builder = PoolBuilder(prompt_file, pairing="consecutive", rank_by="ignored", loser_rank=99, **FAST)
    assert builder.scorer_names == () and builder.select_scorers(None) == {}
    result = build(builder, tmp_path, toy_backbone, {}, shard=(0, 1), progress=True)
    assert f"{len(PROMPTS) * N}/{len(PROMPTS) * N}" in capfd.readouterr().err  # the bar counts images
    rows = pq.read_table(result.path).to_pylist()
    assert len(rows) == len(PROMPTS) * N // 2
    for r, row in enumerate(rows):
        i, k = divmod(r, N // 2)
        assert row["caption"] == PROMPTS[i] and row["prompt_index"] == i and row["label_0"] == 0.5
        assert (row["seed_0"], row["seed_1"]) == (derive_seed(0, i, 2 * k), derive_seed(0, i, 2 * k + 1))
        assert row["pool_seeds"] == [derive_seed(0, i, j) for j in range(N)] and row["pool_scores"] == []
        assert math.isnan(row["score_0"]) and math.isnan(row["score_1"])
    pairs = PreferencePairs(result.path, resolution=32, ties="keep_first")
    assert len(pairs) == len(rows) and pairs[0]["caption"] == PROMPTS[0]


def test_ranked_file_reads_as_pick_a_pic(ranked_file):
    from alignment.data.pickapic import PreferencePairs

    pairs = PreferencePairs(ranked_file, resolution=32)
    assert len(pairs) == len(PROMPTS) and pairs.num_ties_dropped == 0


def test_builds_are_deterministic_and_resume(tmp_path, ranked_file, toy_backbone, prompt_file, scorers):
    reference = pq.read_table(ranked_file)
    again = PoolBuilder(prompt_file, rank_by="toy_colour", **FAST)
    assert build_table(again, toy_backbone, scorers).equals(reference)

    crashing = PoolBuilder(prompt_file, rank_by="toy_colour", **FAST)
    calls = []

    def crash_after_one(items, backbone, selected):
        if calls:
            raise RuntimeError("simulated crash")
        calls.append(list(items))
        return PoolBuilder.build_chunk(crashing, items, backbone, selected)

    crashing.build_chunk = crash_after_one
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(crashing, tmp_path, toy_backbone, scorers, shard=(0, 1), chunk_size=1, progress=False)
    resumed = build(PoolBuilder(prompt_file, rank_by="toy_colour", **FAST), tmp_path, toy_backbone, scorers,
                    shard=(0, 1), chunk_size=1, progress=False)
    assert calls == [[0]] and resumed.complete and resumed.chunks_built == len(PROMPTS) - 1
    chunked = pq.read_table(resumed.path)
    # chunk size 1 is another key; the seeds (and so the pools' starting noise) are the same
    assert resumed.path != ranked_file
    assert chunked.column("pool_seeds").equals(reference.column("pool_seeds"))


def test_seeds_do_not_depend_on_batch_size(toy_backbone, prompt_file):
    one = PoolBuilder(prompt_file, pairing="consecutive", max_prompts=2, batch_size=3, **FAST)  # calls of 3, 3, 2
    many = PoolBuilder(prompt_file, pairing="consecutive", max_prompts=2, batch_size=32, **FAST)
    assert one.key_fields() != many.key_fields()  # batch composition may change the floats: another file
    a, b = build_table(one, toy_backbone), build_table(many, toy_backbone)
    for column in ("seed_0", "seed_1", "pool_seeds", "caption", "prompt_index"):
        assert a.column(column).equals(b.column(column))


def test_key_hashes_the_prompt_list_not_the_path(tmp_path, prompt_file):
    copy = tmp_path / "elsewhere.jsonl"
    copy.write_text("\n".join(f'{{"prompt": "{p}"}}' for p in PROMPTS))
    assert PoolBuilder(copy, pairing="consecutive").key_fields() == \
        PoolBuilder(prompt_file, pairing="consecutive").key_fields()
    fewer = PoolBuilder(prompt_file, pairing="consecutive", max_prompts=2)
    assert fewer.num_items() == 2 and fewer.key_fields() != PoolBuilder(copy, pairing="consecutive").key_fields()


@pytest.mark.parametrize("settings, message", [
    ({"num_images": 1}, r"^builder\.num_images must be >= 2 .*got 1$"),
    ({"num_images": 4, "loser_rank": 4}, r"^builder\.loser_rank must be in \[1, num_images - 1\] = \[1, 3\] "
                                         r"\(0 is the winner; num_images is 4\), got 4$"),
    ({"loser_rank": 0}, r"^builder\.loser_rank must be in \[1, num_images - 1\] = \[1, 19\] .*got 0$"),
    ({"pairing": "consecutive", "num_images": 5}, r"^builder\.num_images must be even with pairing=consecutive"),
    ({"rank_by": None}, r"^builder\.rank_by: ranked pairing needs the scorer"),
    ({"pairing": "best"}, r"^builder\.pairing must be one of ranked, consecutive, got 'best'$"),
    ({"sampler": "euler"}, r"^builder\.sampler must be one of ddim, dpmsolver, got 'euler'$"),
    ({"batch_size": 0}, r"^builder\.batch_size must be a positive integer, got 0$"),
])
def test_bad_settings_are_one_line_errors(prompt_file, settings, message):
    with pytest.raises(ConfigError, match=message) as error:
        PoolBuilder(prompt_file, **{"rank_by": "toy_colour", **settings})
    assert "\n" not in str(error.value)


def test_bad_prompts_and_scorers_are_one_line_errors(tmp_path, prompt_file):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError, match=rf"^dataset\.generate\.prompts: prompt file {missing} does not exist$"):
        PoolBuilder(missing, pairing="consecutive", config_key="dataset.generate")
    with pytest.raises(ConfigError, match=r"^builder\.prompts: set the prompt file"):
        PoolBuilder(None, pairing="consecutive")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(DataError, match=rf"^builder\.prompts: prompt file {empty} holds no prompts$"):
        PoolBuilder(empty, pairing="consecutive")
    builder = PoolBuilder(prompt_file, rank_by="pickscore")
    assert builder.scorer_names == ("pickscore",)
    with pytest.raises(ConfigError, match=r"^scorers: builder\.rank_by is 'pickscore', which is not a configured "
                                          r"scorer \(add it: scorers=\[pickscore\]; configured: toy_colour\)$"):
        builder.select_scorers({"toy_colour": ToyColour()})


def test_configs_build_the_builder(prompt_file):
    from alignment.config import instantiate_checked

    node = OmegaConf.load(REPO / "conf/builder/pools.yaml")
    node.prompts, node.rank_by = str(prompt_file), "toy_colour"
    builder = instantiate_checked(node, "builder")
    assert isinstance(builder, PoolBuilder) and builder.num_images == 20 and builder.pairing == "ranked"
    dataset = OmegaConf.load(REPO / "conf/dataset/pools.yaml")
    assert dataset._target_ == "alignment.data.pickapic.PreferencePairs"
    generate = dataset.generate
    with pytest.raises(ConfigError, match=r"^dataset\.generate\.prompts: set the prompt file"):
        instantiate_checked(generate, "dataset.generate", config_key="dataset.generate")
    generate.prompts, generate.pairing = str(prompt_file), "consecutive"
    assert instantiate_checked(generate, "dataset.generate", config_key="dataset.generate").num_items() == 3


def test_cli_builds_the_file_and_names_bad_keys(tmp_path, prompt_file):
    args = ("pools", "backbone=toy", f"builder.prompts={prompt_file}", "builder.num_images=4",
            "builder.num_inference_steps=2", "scorers=toy_colour", "builder.rank_by=toy_colour", f"out={tmp_path}")
    first = run_cli("alignment.build", *args, "progress=false")
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"({len(PROMPTS)} rows)" in first.stdout
    assert len(list(tmp_path.glob("pools-*.parquet"))) == 1
    bad = run_cli("alignment.build", *args, "builder.loser_rank=4")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: builder.loser_rank must be")


# ------------------------------------------------------------------------------------------- resolution and keys
def test_scorers_say_which_resolutions_they_can_score():
    from alignment.scorers.base import Scorer
    from alignment.scorers.clip_scorers import PickScore

    for resolution in (32, 48, 512, [704, 1024]):
        assert Scorer.check_resolution(resolution, "scorers.any") is None       # default: any size
        assert PickScore.check_resolution(resolution, "scorers.pickscore") is None   # resizes to 224 itself
    for resolution in (32, 64, 512, [32, 64]):
        assert ToyColour.check_resolution(resolution, "scorers.toy_colour") is None  # k·32 pools onto the grid
    for resolution, size in ((48, "48"), (16, "16"), ([32, 48], "32x48")):
        with pytest.raises(ConfigError, match=rf"^scorers\.c: scorer 'toy_colour' scores the toy world's 32 px "
                                              rf"images .*, not the backbone's {size} px samples$"):
            ToyColour.check_resolution(resolution, "scorers.c")


def test_a_scorer_that_cannot_score_the_backbone_resolution_fails_before_sampling(tmp_path, prompt_file, scorers):
    from alignment.backbones.tiny import build_tiny_backbone
    from alignment.builders.runner import output_path

    builder = PoolBuilder(prompt_file, rank_by="toy_colour", **FAST)

    def no_sampling(*args):
        raise AssertionError("sampled before the resolution check")

    builder.build_chunk = no_sampling
    backbone = build_tiny_backbone(resolution=48)
    message = (r"^scorers\.toy_colour: scorer 'toy_colour' scores the toy world's 32 px images \(or whole multiples "
               r"of 32 px, area-pooled\), not the backbone's 48 px samples$")
    with pytest.raises(ConfigError, match=message):
        build(builder, tmp_path, backbone, scorers, shard=(0, 1), progress=False)
    with pytest.raises(ConfigError, match=message):
        build_table(builder, backbone, scorers)
    assert not list(tmp_path.iterdir())                                    # nothing sampled, nothing written
    assert output_path(builder, tmp_path, build_tiny_backbone(resolution=64), scorers).name.startswith("pools-")
    consecutive = PoolBuilder(prompt_file, pairing="consecutive", **FAST)   # no scorer: any resolution
    assert output_path(consecutive, tmp_path, backbone, scorers).name.startswith("pools-")


def test_cli_checks_rank_by_and_resolution_before_any_model_loads(tmp_path, prompt_file):
    # the sd15 backbone cannot load offline: an error about it would mean the check came too late
    cases = (
        (("hg_dpo", "scorers=toy_colour"),
         "error: scorers: builder.rank_by is 'pickscore', which is not a configured scorer (add it: "
         "scorers=[pickscore]; configured: toy_colour)"),
        (("pools", "backbone=sd15", "backbone.resolution=48", "scorers=toy_colour", "builder.rank_by=toy_colour"),
         "error: scorers.toy_colour: scorer 'toy_colour' scores the toy world's 32 px images (or whole multiples of "
         "32 px, area-pooled), not the backbone's 48 px samples"),
    )
    for args, message in cases:
        proc = run_cli("alignment.build", *args, f"builder.prompts={prompt_file}", f"out={tmp_path}",
                       f"hydra.run.dir={tmp_path / 'run'}")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and lines == [message], proc.stderr[-2000:]
    assert not list(tmp_path.glob("*pools-*"))


class ToyShapeAsColour(ToyColour):
    """Another scorer class under the same config name."""


def test_another_prompt_list_or_backbone_builds_another_file(tmp_path, toy_backbone, scorers):
    from alignment.builders.runner import output_path
    from alignment.toy.backbone import build_toy_backbone

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue circle\na purple square\n")
    settings = {"rank_by": "toy_colour", "num_images": 2, "num_inference_steps": 2}
    out = tmp_path / "pools"
    first = build(PoolBuilder(prompts, **settings), out, toy_backbone, scorers, shard=(0, 1), progress=False)
    again = build(PoolBuilder(prompts, **settings), out, toy_backbone, scorers, shard=(0, 1), progress=False)
    assert again.path == first.path and again.chunks_built == 0             # the same list: reused
    prompts.write_text("a blue circle\na green triangle\n")                 # same path, another list
    edited = build(PoolBuilder(prompts, **settings), out, toy_backbone, scorers, shard=(0, 1), progress=False)
    assert edited.path != first.path and edited.chunks_built == 1 and first.path.exists()
    assert pq.read_table(edited.path).column("caption").to_pylist() == ["a blue circle", "a green triangle"]
    # other backbone weights (the same architecture, untrained): another key, another file
    untrained = build_toy_backbone(random_init=True)
    assert output_path(PoolBuilder(prompts, **settings), out, untrained, scorers) != edited.path
    # and another ranking scorer's weights or class: another file too
    assert output_path(PoolBuilder(prompts, **settings), out, toy_backbone,
                       {"toy_colour": ToyShapeAsColour()}) != edited.path

