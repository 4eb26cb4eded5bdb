"""Toy preference pairs: the caption split, labels recomputable from the stored file, caching, config errors, and a
training run that reads them through dataset=toy_pairs."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from alignment.errors import ConfigError
from alignment.toy import pairs as P
from alignment.toy import world as W
from alignment.toy.scorers import ToyPreference, ToyShape
from tests.conftest import FAST_RUN, run_cli


def test_split_is_fixed_disjoint_and_covers_both_kinds():
    train, heldout = P.split_captions()
    assert (len(train), len(heldout)) == (56, 28)
    assert not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(W.all_captions(include_toxic=False))
    kinds = [W.parse_caption(c).kind for c in heldout]
    assert kinds.count("object") == 4 and kinds.count("figure") == 24
    assert P.split_captions() == (train, heldout)  # no randomness
    assert P.captions_for("all") == train + heldout
    train_toxic, heldout_toxic = P.split_captions(include_toxic=True)
    assert any(W.parse_caption(c).bloody for c in heldout_toxic + train_toxic)
    with pytest.raises(ConfigError, match="split must be one of train, heldout, all, got 'test'"):
        P.captions_for("test")
    with pytest.raises(ConfigError, match="heldout_fraction must be in"):
        P.split_captions(1.0)


def decode(blob: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(blob)).convert("RGB"))).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def toy_backbone():
    from alignment.toy.backbone import build_toy_backbone

    return build_toy_backbone()


def test_labels_follow_the_rater_on_the_stored_pixels(toy_backbone):
    captions = ["a green circle", "a photo of a female teacher"]
    table = P.build_toy_pair_table(toy_backbone, captions, pairs_per_caption=3, guidance_scales=[1.0, 3.0],
                                   num_inference_steps=8, seed=7, tie_margin=0.02)
    rows = table.to_pylist()
    assert len(rows) == 6 and [r["caption"] for r in rows] == [captions[0]] * 3 + [captions[1]] * 3
    assert [r["guidance_scale"] for r in rows] == [1.0, 3.0, 1.0, 3.0, 1.0, 3.0]
    assert [(r["seed_0"], r["seed_1"]) for r in rows] == [(7 + 2 * p, 8 + 2 * p) for p in range(6)]
    rater = ToyPreference()
    images_0 = torch.stack([decode(r["jpg_0"]) for r in rows])
    images_1 = torch.stack([decode(r["jpg_1"]) for r in rows])
    prompts = [r["caption"] for r in rows]
    torch.testing.assert_close(rater(images_0, prompts).double(), torch.tensor([r["score_0"] for r in rows],
                                                                               dtype=torch.float64))
    torch.testing.assert_close(rater(images_1, prompts).double(), torch.tensor([r["score_1"] for r in rows],
                                                                               dtype=torch.float64))
    for r in rows:
        gap = r["score_0"] - r["score_1"]
        assert r["label_0"] == (1.0 if gap > 0.02 else 0.0 if gap < -0.02 else 0.5)
    assert len({r["jpg_0"] for r in rows} | {r["jpg_1"] for r in rows}) == 12  # every sample differs
    # the batch size only groups the sampling: same bytes
    again = P.build_toy_pair_table(toy_backbone, captions, pairs_per_caption=3, guidance_scales=[1.0, 3.0],
                                   num_inference_steps=8, seed=7, tie_margin=0.02, batch_size=4)
    assert again.equals(table)
    # another judge labels by its own score
    by_shape = P.build_toy_pair_table(toy_backbone, captions[:1], pairs_per_caption=2, num_inference_steps=8, seed=7,
                                      judge="toy_shape").to_pylist()
    shape = ToyShape()
    assert by_shape[0]["score_0"] == pytest.approx(float(shape(decode(by_shape[0]["jpg_0"])[None], captions[:1])),
                                                   abs=1e-5)


def test_bad_generation_settings_name_the_key(toy_backbone):
    for kwargs, message in (({"judge": "pickscore"}, "dataset.generate.judge: unknown toy scorer 'pickscore'"),
                            ({"pairs_per_caption": 0}, "dataset.generate.pairs_per_caption must be >= 1, got 0"),
                            ({"guidance_scales": [0.5]}, "dataset.generate.guidance_scales must be"),
                            ({"tie_margin": -1}, "dataset.generate.tie_margin must be >= 0")):
        with pytest.raises(ConfigError, match=message):
            P.build_toy_pair_table(toy_backbone, ["a green circle"], **{"num_inference_steps": 2, **kwargs})
    with pytest.raises(ConfigError, match="dataset.generate.weights: /no/such/folder holds no model.safetensors"):
        P.ensure_toy_pairs("/tmp/unused", weights="/no/such/folder")


def test_ensure_writes_once_per_setting(tmp_path, monkeypatch):
    calls = []
    real = P.build_toy_pair_table

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "build_toy_pair_table", counting)
    settings = dict(pairs_per_caption=1, num_inference_steps=2, guidance_scales=[3.0])
    first = P.ensure_toy_pairs(tmp_path, **settings)
    assert first.parent == tmp_path and first.name.startswith("pairs-") and len(calls) == 1
    assert calls[0] == P.split_captions()[0]  # training captions only
    assert P.ensure_toy_pairs(tmp_path, **settings) == first and len(calls) == 1  # reused
    other = P.ensure_toy_pairs(tmp_path, **{**settings, "seed": 1})
    assert other != first and len(calls) == 2
    info = json.loads(first.with_suffix(".json").read_text())
    assert info["rows"] == 56 and info["settings"]["split"] == "train"
    assert pq.read_table(first).num_rows == 56
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_training_reads_generated_toy_pairs(tmp_path):
    """dataset=toy_pairs through the CLI: the generate node's _target_ writes the file, training reads it; a
    misspelt generate key is refused by name before anything is sampled."""
    data = tmp_path / "data"
    run = tmp_path / "run"
    common = ("backbone=toy", "dataset=toy_pairs", "dataset.generate.pairs_per_caption=1",
              "dataset.generate.num_inference_steps=2", "dataset.batch_size=4", *FAST_RUN)
    proc = run_cli("alignment.run", *common, "trainer.max_steps=2", f"hydra.run.dir={run}",
                   env={"ALIGNMENT_DATA_DIR": str(data)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dataset: generated pairs in" in proc.stderr
    assert len(list((data / "toy_pairs").glob("pairs-*.parquet"))) == 1
    assert (run / "lora" / "pytorch_lora_weights.safetensors").exists()
    bad = run_cli("alignment.run", *common, "+dataset.generate.pairs_per_captio=3", f"hydra.run.dir={tmp_path / 'b'}",
                  env={"ALIGNMENT_DATA_DIR": str(tmp_path / "data2")})
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: dataset.generate.pairs_per_captio: unknown key")
    assert not (tmp_path / "data2" / "toy_pairs").exists()


def test_cli_prints_a_split_for_evaluation(capsys):
    assert P.main(["--captions", "heldout"]) is None
    assert capsys.readouterr().out.splitlines() == P.split_captions()[1]


def test_quality_scorers_disagree_on_pairs_of_base_samples(toy_backbone):
    """What BalancedDPO / HG-DPO need from the world: on pairs of the base model's own samples the quality scorers
    often prefer different images (measured on the demo's 896 pairs: colour vs contrast agree on 45 %, colour vs
    centring 53 %, contrast vs the rater 46 %), so optimising one of them alone is not optimising the others."""
    from alignment.toy.scorers import ToyCentring, ToyColour, ToyContrast

    table = P.build_toy_pair_table(toy_backbone, P.split_captions()[0], pairs_per_caption=2, num_inference_steps=12,
                                   seed=3, judge="toy_colour").to_pylist()
    x0 = torch.stack([decode(r["jpg_0"]) for r in table])
    x1 = torch.stack([decode(r["jpg_1"]) for r in table])
    prompts = [r["caption"] for r in table]
    sign = {}
    for scorer in (ToyColour(), ToyContrast(), ToyCentring(), ToyPreference()):
        with torch.no_grad():
            sign[scorer.name] = torch.sign(scorer(x0, prompts) - scorer(x1, prompts))

    def agreement(a, b):
        decided = (sign[a] != 0) & (sign[b] != 0)
        return float((sign[a][decided] == sign[b][decided]).float().mean())

    assert agreement("toy_colour", "toy_contrast") < 0.65
    assert agreement("toy_colour", "toy_centring") < 0.75
    assert agreement("toy_contrast", "toy_preference") < 0.65
    assert agreement("toy_colour", "toy_preference") > agreement("toy_colour", "toy_contrast")


def test_demo_reports_a_bad_training_override_in_one_line(tmp_path, capsys, monkeypatch):
    """A typo in a training override fails before any pair is generated, as one line naming the key."""
    from alignment.toy import demo

    monkeypatch.setenv("ALIGNMENT_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--out", str(tmp_path / "out"), "--logger", "none", "trainer.max_steps=0"])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: alignment.run: trainer.max_steps must be")
    assert not (tmp_path / "data").exists() and not (tmp_path / "out" / "evaluate").exists()
