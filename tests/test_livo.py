"""LiVO (docs/methods.md#livo): the loss forms against hand-computed values, the value token, the base conditioning
without a value, what trains, the export, a short training run and generation with it, and bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from alignment.cli import CONF_DIR
from alignment.errors import AlignmentError, ConfigError, DataError
from alignment.objectives.livo import LiVO, ValueEncoder, ValueInPrompt, livo_loss
from tests.conftest import FAST_RUN, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

GENDER, NUDITY = "gender equality", "nudity considered inappropriate"

# ------------------------------------------------------------------------------------------------ loss forms
THETA_W, THETA_L = [0.10, 0.20], [0.30, 0.25]
REF_W, REF_L = [0.1005, 0.19], [0.2990, 0.26]


def _errors():
    return [torch.tensor(v, dtype=torch.float64) for v in (THETA_W, THETA_L, REF_W, REF_L)]


def test_livo_loss_eq6_hand_computed():
    # sample 0: max(0, 1 + 1000·(0.10 − 0.1005)) = 0.5, max(0, 0.5 + 500·(0.2990 − 0.30)) = 0
    # sample 1: 1 + 1000·0.01 = 11, 0.5 + 500·0.01 = 5.5  → per sample 0.5, 16.5; mean 8.5
    losses, terms = livo_loss(*_errors(), "livo", beta=1000, alpha=500, gamma1=1.0, gamma2=0.5)
    assert losses.tolist() == pytest.approx([0.5, 16.5])
    assert terms["loss_l"].tolist() == pytest.approx([0.0, 5.5])
    assert losses.mean().item() == pytest.approx(8.5)


def test_no_margin_eq20_hand_computed():
    # sample 0: 1000·(−0.0005) + 500·(−0.001) = −1.0; sample 1: 1000·0.01 + 500·0.01 = 15
    losses, _ = livo_loss(*_errors(), "no_margin", beta=1000, alpha=500, gamma1=1.0, gamma2=0.5)
    assert losses.tolist() == pytest.approx([-1.0, 15.0])


@pytest.mark.parametrize("form,beta,alpha", [("dpo", 0.5, 123.0), ("dpo_d", 2.0, 0.5)])
def test_dpo_forms_eq13_eq14_hand_computed(form, beta, alpha):
    beta_l = beta if form == "dpo" else alpha
    expected = []
    for tw, tl, rw, rl in zip(THETA_W, THETA_L, REF_W, REF_L):
        inside = beta * math.log(rw / tw) - beta_l * math.log(rl / tl)
        expected.append(math.log(1 + math.exp(-inside)))        # −log σ(inside)
    losses, _ = livo_loss(*_errors(), form, beta=beta, alpha=alpha, gamma1=1.0, gamma2=0.5)
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_dapt_is_the_preferred_error():
    losses, _ = livo_loss(*_errors(), "dapt", beta=1, alpha=1, gamma1=0, gamma2=0)
    assert losses.tolist() == THETA_W


# ------------------------------------------------------------------------------------------------ conditioning
@pytest.fixture(scope="module")
def backbone():
    from alignment.backbones.tiny import build_tiny_backbone

    return build_tiny_backbone(seed=0)


def test_value_token_is_the_pooled_output_of_value_comma_prompt(backbone):
    encoder = ValueEncoder()
    encoder.setup(backbone)
    prompts = ["a red circle on a white background", "a blue square"]
    prompt_cond = backbone.encode_prompt(prompts)
    with torch.no_grad():
        cond = encoder(backbone, prompts, {"value": [GENDER, None]}, prompt_cond)["encoder_hidden_states"]
        ids = backbone.tokenizer([f"{GENDER}, {prompts[0]}"], padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
        pooled = backbone.text_encoder(ids).pooler_output  # the untrained copy has E's weights
    hidden = prompt_cond["encoder_hidden_states"]
    assert cond.shape == (2, 78, hidden.shape[-1])
    assert torch.equal(cond[0, 0], pooled[0])
    assert torch.equal(cond[:, 1:], hidden)                       # the frozen prompt embedding follows
    assert torch.equal(cond[1, 0], hidden[1, -1])                 # no value in a mixed batch: the pad token
    negative = encoder.negative(backbone, backbone.negative_conditioning(2), {"value": [GENDER, None]})
    empty = backbone.negative_conditioning(2)["encoder_hidden_states"]
    assert torch.equal(negative["encoder_hidden_states"][:, 1:], empty)   # CFG: empty prompt, no value token
    assert torch.equal(negative["encoder_hidden_states"][:, 0], empty[:, -1])


def test_no_value_is_the_base_conditioning_and_images(backbone):
    from alignment.sampling.sample import sample_images

    encoder = ValueEncoder()
    encoder.setup(backbone)
    with torch.no_grad():  # make the value encoder differ from E: a value would change the images
        for p in encoder.parameters():
            p.add_(0.1)
    prompts = ["a red circle on a white background", "a blue square"]
    prompt_cond = backbone.encode_prompt(prompts)
    assert encoder(backbone, prompts, {"value": [None, None]}, prompt_cond) is prompt_cond
    options = dict(num_inference_steps=3, guidance_scale=5.0)
    base = sample_images(backbone, prompts, [0, 1], **options)
    plain = sample_images(backbone, prompts, [0, 1], conditioner=encoder, extras={"value": [None, None]}, **options)
    valued = sample_images(backbone, prompts, [0, 1], conditioner=encoder, extras={"value": [GENDER, GENDER]},
                           **options)
    assert torch.equal(base, plain)
    assert not torch.equal(base, valued)


def test_value_in_prompt_ablation_encodes_value_comma_prompt(backbone):
    conditioner = ValueInPrompt()
    prompts = ["a red circle", "a blue square"]
    prompt_cond = backbone.encode_prompt(prompts)
    cond = conditioner(backbone, prompts, {"value": [NUDITY, None]}, prompt_cond)["encoder_hidden_states"]
    assert torch.equal(cond[0], backbone.encode_prompt([f"{NUDITY}, a red circle"])["encoder_hidden_states"][0])
    assert torch.equal(cond[1], prompt_cond["encoder_hidden_states"][1])


def test_value_outside_the_set_is_an_error(backbone):
    encoder = ValueEncoder(values=[GENDER])
    encoder.setup(backbone)
    with pytest.raises(ConfigError, match="not in the configured value set"):
        encoder(backbone, ["a cat"], {"value": ["kindness"]}, backbone.encode_prompt(["a cat"]))


# ------------------------------------------------------------------------------------------------ what trains
def _pair_batch(size: int = 2) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"pixel_values_w": torch.rand(size, 3, 32, 32, generator=generator) * 2 - 1,
            "pixel_values_l": torch.rand(size, 3, 32, 32, generator=generator) * 2 - 1,
            "caption": ["a red circle", "a blue square"][:size], "index": list(range(size)),
            "extras": {"value": [GENDER, NUDITY][:size]}}


@pytest.mark.parametrize("finetune", ["none", "full"])
def test_only_the_value_encoder_trains_unless_the_unet_is_unfrozen(finetune):
    from alignment.backbones.tiny import build_tiny_backbone
    from alignment.training.module import AlignmentModule

    backbone = build_tiny_backbone(seed=0)
    module = AlignmentModule(backbone, LiVO(), finetune=finetune)
    out = module.objective(backbone, module.to_batch(_pair_batch()), 0)
    out.loss.backward()
    encoder = module.objective.conditioner
    assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad)
    assert any(p.grad.abs().sum() > 0 for p in encoder.parameters() if p.grad is not None)
    for part in (backbone.vae, backbone.text_encoder):
        assert all(p.grad is None and not p.requires_grad for p in part.parameters())
    unet_grads = [p.grad for p in backbone.unet.parameters()]
    names = module.trainable_names()
    if finetune == "none":
        assert all(g is None for g in unet_grads)
        assert names and all(n.startswith("objective.conditioner.") for n in names)
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in unet_grads)
        assert any(n.startswith("backbone.unet.") for n in names)
    assert {"loss_w", "loss_l", "margin_w", "margin_l", "implicit_acc"} <= set(out.logs)


# ------------------------------------------------------------------------------------------------ runs
def _write_prompts(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def livo_run(tmp_path_factory) -> Path:
    """Two LiVO steps on the tiny backbone, on the synthetic LiVO data it builds by itself."""
    tmp = tmp_path_factory.mktemp("livo_run")
    run_dir = tmp / "run"
    proc = run_cli("alignment.run", *FAST_RUN, "method=livo", "dataset=livo", "backbone=tiny", "trainer.max_steps=2",
                   "dataset.batch_size=2", "method.optimizer.lr=1e-3", "method.lr_scheduler.warmup_steps=0",
                   f"hydra.run.dir={run_dir}", env={"ALIGNMENT_DATA_DIR": str(tmp / "data")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_export_reloads_with_clip_text_model(livo_run, backbone):
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from alignment.conditioning import load_conditioner

    folder = livo_run / "conditioner"
    config = json.loads((folder / "conditioner.json").read_text())
    assert config["config"]["values"][0] == GENDER and config["extras"] == ["value"]
    reloaded = CLIPTextModel.from_pretrained(str(folder / "value_encoder"))
    stored = load_file(str(folder / "conditioner.safetensors"))
    assert set(stored) == set(reloaded.state_dict())
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in stored.items())
    changed = any(not torch.equal(stored[k], v) for k, v in backbone.text_encoder.state_dict().items())
    assert changed  # two steps at lr 1e-3 moved the copy away from E
    conditioner = load_conditioner(folder, backbone)
    assert all(torch.equal(conditioner.state_dict()[k], v) for k, v in stored.items())


@pytest.mark.slow   # a python -m alignment.* subprocess end to end
def test_generate_with_the_run_no_value_prompts_match_the_base(livo_run, tmp_path):
    prompts = _write_prompts(tmp_path / "p.jsonl", [{"prompt": "a red circle on a white background"},
                                                    {"prompt": "a blue square on a white background",
                                                     "value": None}])
    out = tmp_path / "images"
    proc = run_cli("alignment.generate", f"prompts={prompts}", "+models.base=null", f"+models.livo.run={livo_run}",
                   "num_inference_steps=3", "seeds=[0,1]", f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("00000_seed0.png", "00001_seed1.png"):
        assert Image.open(out / "base" / name).tobytes() == Image.open(out / "livo" / name).tobytes()
    valued = _write_prompts(tmp_path / "v.jsonl", [{"prompt": "a red circle on a white background",
                                                    "value": GENDER}])
    proc = run_cli("alignment.generate", f"prompts={valued}", f"adapter={livo_run}", "num_inference_steps=3",
                   f"out_dir={tmp_path / 'valued'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((tmp_path / "valued" / "index.jsonl").read_text().splitlines()[0])
    assert row["extras"] == {"value": GENDER}


def test_untrained_ablations_export_without_training(tmp_path):
    for method in ("livo_untrained_encoder", "livo_no_value_encoder"):
        run_dir = tmp_path / method
        proc = run_cli("alignment.export_untrained", f"method={method}", "backbone=tiny", "logger=none",
                       f"hydra.run.dir={run_dir}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        spec = json.loads((run_dir / "conditioner" / "conditioner.json").read_text())
        assert spec["_target_"].endswith("ValueEncoder" if "untrained" in method else "ValueInPrompt")
        assert (run_dir / "config.yaml").is_file()


# ------------------------------------------------------------------------------------------------ bad inputs
def _compose(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*FAST_RUN, "trainer.max_steps=1", "dataset=livo",
                                                        f"output_dir={tmp_path / 'run'}", *overrides])


@pytest.mark.parametrize("overrides,expected", [
    (("method=livo", "method.loss=hinge"), "method.loss must be one of"),
    (("method=livo", "method.beta=0"), "method.beta must be > 0"),
    (("method=livo_untrained_encoder",), "trains nothing"),
    (("method=livo", "backbone=sdxl"), "SD 1.x / 2.x only"),
])
def test_bad_method_settings_fail_before_any_model(tmp_path, overrides, expected):
    from alignment.run import train

    with pytest.raises(AlignmentError) as info:
        train(_compose(tmp_path, *overrides))
    assert expected in str(info.value) and "\n" not in str(info.value)


def _dataset(tmp_path, rows: list[dict], **kwargs):
    from alignment.data.livo import ValuePairs

    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (8, 8), colour).save(folder / "img" / name)
    path = folder / "livo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ValuePairs(str(path), resolution=8, **kwargs)


GOOD = [{"prompt": "p", "value": GENDER, "category": "bias", "image": "img/a.png", "label": 1},
        {"prompt": "p", "value": GENDER, "category": "bias", "image": "img/b.png", "label": 0}]


def test_dataset_pairs_within_a_prompt_and_carries_the_value(tmp_path):
    rows = GOOD + [{**GOOD[0], "image": "img/b.png"}, {**GOOD[0], "prompt": "q"}, {**GOOD[1], "prompt": "q"},
                   {**GOOD[0], "prompt": "lonely"}]
    data = _dataset(tmp_path, rows)
    assert len(data) == 3 and data.num_unpaired_groups == 1
    item = data[0]
    assert item["extras"] == {"value": GENDER} and item["caption"] == "p"
    assert item["pixel_values_w"][0].mean() > item["pixel_values_l"][0].mean()   # red preferred over blue
    assert len(_dataset(tmp_path, rows, fraction=0.5)) == 2


@pytest.mark.parametrize("change,expected", [
    ({"value": None}, "line 1: missing 'value'"),
    ({"label": None}, "line 1: missing 'label'"),
    ({"value": "kindness"}, "line 1: value 'kindness' is not in the configured value set"),
    ({"label": 2}, "line 1: 'label' must be 1"),
    ({"image": "../outside.png"}, "line 1: image '../outside.png' lies outside the dataset folder"),
    ({"image": "img/missing.png"}, "line 1: image file"),
])
def test_dataset_bad_rows_name_file_and_line(tmp_path, change, expected):
    (tmp_path / "outside.png").write_bytes(b"")
    row = {k: v for k, v in {**GOOD[0], **change}.items() if v is not None}
    with pytest.raises(DataError) as info:
        _dataset(tmp_path, [row, GOOD[1]])
    assert expected in str(info.value) and "livo.jsonl" in str(info.value) and "\n" not in str(info.value)


def test_dataset_checks_resolve_interpolations_inside_the_generate_node():
    """dataset_class checks the loader keys (generate among them) resolved against the run config: a ${...} inside
    dataset.generate used to fail there, detached from the config it points into."""
    from omegaconf import OmegaConf

    from alignment.data.component import dataset_class

    cfg = OmegaConf.create({"backbone": {"name": "tiny"}, "dataset": {
        "_target_": "alignment.data.pickapic.PreferencePairs", "source": "unused",
        "generate": {"_target_": "alignment.builders.pools.PoolBuilder", "prompts": "${backbone.name}.txt"}}})
    assert dataset_class(cfg.dataset).kind == "pairs"
