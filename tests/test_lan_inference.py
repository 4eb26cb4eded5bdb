"""HG-DPO's inference settings in ``alignment.generate`` / ``alignment.evaluate``: LAN (latent adaptive normalisation
against the base model, ``lan``) and the LoRA scale a run records (``method.inference`` of its config.yaml).

Every check runs in-process on the tiny backbone (random weights, CPU): LAN images are compared with
``sample_with_lan`` called directly with the base model as target, so the wiring (which UNet, which conditioning, which
sampler) is what is tested; the cache keys of models without LAN are compared with hard-coded dicts, so images cached
before LAN existed are still reused.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from alignment.cli import CONF_DIR
from alignment.conditioning import Conditioner
from alignment.errors import ConfigError
from alignment.training.lora import LORA_WEIGHT_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle on a white background"
SAMPLING = dict(num_inference_steps=3, guidance_scale=3.0, negative_prompt="", sampler="dpmsolver")


# ------------------------------------------------------------------------------------------------ helpers
def compose(config: str, *overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config, overrides=list(overrides))


def generate(out_dir: Path, *overrides: str) -> list[dict]:
    """``python -m alignment.generate`` in-process (one prompt, seeds 0 and 1, DPMSolver, 3 steps); its index rows."""
    from alignment.generate import generate as run_generate

    run_generate(compose("generate", f"prompt={PROMPT}", "seeds=[0,1]", "num_inference_steps=3", "guidance_scale=3.0",
                         "sampler=dpmsolver", "grid=false", f"out_dir={out_dir}", *overrides))
    return [json.loads(line) for line in (out_dir / "index.jsonl").read_text().splitlines()]


def pixels(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(folder / f"00000_seed{s}.png").convert("RGB"), dtype=np.int16) for s in (0, 1)]


def as_arrays(images: torch.Tensor) -> list[np.ndarray]:
    from alignment.sampling.sample import to_pil

    return [np.asarray(image, dtype=np.int16) for image in to_pil(images)]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def tiny_backbone():
    """The backbone ``backbone=tiny`` builds (the same node generate and evaluate use)."""
    from alignment.config import instantiate_checked

    backbone = instantiate_checked(compose("generate", "prompt=x").backbone, "backbone")
    return backbone.to(torch.device("cpu")).eval()


@contextmanager
def adapters_disabled(unet):
    """The base model of a UNet carrying a LoRA, for a ``with`` block (the reference way: PEFT's own switch)."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def write_config(run: Path, inference: dict | None) -> None:
    """A run folder's config.yaml: the backbone it was trained on and, optionally, ``method.inference``."""
    node = {"backbone": OmegaConf.to_container(compose("generate", "prompt=x").backbone, resolve=True),
            "method": {"name": "hg_dpo", **({"inference": inference} if inference is not None else {})}}
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(node)))


def lora_run(root: Path, lora_dir: Path, inference: dict | None) -> Path:
    """A LoRA training run folder (``lora/`` + config.yaml) holding the shared random LoRA."""
    run = root / "lora_run"
    (run / "lora").mkdir(parents=True)
    (run / "lora" / LORA_WEIGHT_NAME).write_bytes((lora_dir / LORA_WEIGHT_NAME).read_bytes())
    write_config(run, inference)
    return run


@pytest.fixture(scope="module")
def lora_file(random_lora_dir) -> Path:
    return random_lora_dir / LORA_WEIGHT_NAME


# ------------------------------------------------------------------------------------------- (a) LoRA + LAN
def test_lan_on_a_lora_equals_sample_with_lan_against_the_adapters_disabled(lora_file, tmp_path):
    from alignment.runs import load_adapter
    from alignment.sampling.lan import sample_with_lan

    rows = generate(tmp_path / "lan", f"adapter={lora_file}", "lan=true")
    assert [(r["lan"], r["lora_scale"]) for r in rows] == [(True, 1.0), (True, 1.0)]
    generate(tmp_path / "plain", f"adapter={lora_file}", "lan=false")

    backbone = tiny_backbone()
    load_adapter(backbone, lora_file, scale=1.0, adapter_name="direct")
    expected = sample_with_lan(backbone, [PROMPT] * 2, [0, 1], target_unet=lambda: adapters_disabled(backbone.unet),
                               **SAMPLING)
    assert same(pixels(tmp_path / "lan"), as_arrays(expected))
    assert not same(pixels(tmp_path / "lan"), pixels(tmp_path / "plain"))  # LAN changes the LoRA's images


def test_the_target_switches_the_lora_off_only_for_its_block(lora_file):
    from alignment.runs import ModelSpec, model_loaded
    from alignment.sampling.sample import sample_images

    backbone = tiny_backbone()
    base = sample_images(backbone, [PROMPT], [0], **SAMPLING)
    spec = ModelSpec(name="hg", adapter=lora_file, adapter_sha256="x", lan=True)
    with model_loaded(backbone, spec) as model:
        policy = sample_images(backbone, [PROMPT], [0], **SAMPLING)  # the LoRA model, without LAN
        with model.target() as unet:
            assert unet is backbone.unet
            assert torch.equal(sample_images(backbone, [PROMPT], [0], **SAMPLING), base)
        with pytest.raises(RuntimeError, match="inside"), model.target():
            raise RuntimeError("inside")
        assert torch.equal(sample_images(backbone, [PROMPT], [0], **SAMPLING), policy)  # the LoRA is on again
        model.sample([PROMPT], [0], **SAMPLING)
        assert torch.equal(sample_images(backbone, [PROMPT], [0], **SAMPLING), policy)
    assert not torch.equal(policy, base)


# ------------------------------------------------------------------------------------------- (b) base model
def test_lan_on_the_base_model_is_plain_sampling(tmp_path):
    from alignment.sampling.lan import sample_with_lan
    from alignment.sampling.sample import sample_images

    rows = generate(tmp_path / "lan", "lan=true")
    assert [r["lan"] for r in rows] == [False, False]  # recorded as what it is: plain sampling
    generate(tmp_path / "plain")
    assert same(pixels(tmp_path / "lan"), pixels(tmp_path / "plain"))
    # and LAN of a model against itself is plain sampling, with a multistep sampler's state kept per trajectory
    backbone = tiny_backbone()
    plain = sample_images(backbone, [PROMPT] * 2, [0, 1], **SAMPLING)
    against_itself = sample_with_lan(backbone, [PROMPT] * 2, [0, 1], target_unet=backbone.unet, **SAMPLING)
    assert torch.allclose(plain, against_itself, atol=1e-4)


# ------------------------------------------------------------------------------------------- (c) evaluate
def test_evaluate_compares_a_model_with_and_without_lan_and_keeps_old_cache_keys(lora_file, tmp_path, monkeypatch):
    from alignment.evaluate import evaluate
    from alignment.evaluation.cache import generation_settings, settings_key
    from alignment.evaluation.plan import build_plan
    from alignment.runs import file_sha256

    images = tmp_path / "images"
    overrides = [f"output_dir={tmp_path / 'out'}", f"image_dir={images}", "images_per_prompt=1",
                 "num_inference_steps=2", "metrics.change.enabled=false", "report.enabled=false",
                 f"+models.hg.adapter={lora_file}", f"+models.hg_lan.adapter={lora_file}", "+models.hg_lan.lan=true"]
    first = evaluate(compose("evaluate", *overrides))
    assert first["generated"] == 6 and first["reused"] == 0  # 3 models x 2 prompts
    manifests = {m: json.loads((images / m / "manifest.json").read_text()) for m in ("base", "hg", "hg_lan")}
    keys = {m: {e["settings"] for e in manifest["images"].values()} for m, manifest in manifests.items()}
    (hg_key,), (lan_key,) = keys["hg"], keys["hg_lan"]
    assert hg_key != lan_key
    assert manifests["hg_lan"]["settings"][lan_key]["lan"] is True and "lan" not in manifests["hg"]["settings"][hg_key]
    assert (images / "hg" / "00000_seed0.png").read_bytes() != (images / "hg_lan" / "00000_seed0.png").read_bytes()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {m: d["lan"] for m, d in metrics["config"]["models"].items()} == {"base": False, "hg": False,
                                                                            "hg_lan": True}

    # A rerun generates nothing (sample_with_lan is not called either).
    import alignment.sampling.lan as lan

    calls = []
    monkeypatch.setattr(lan, "sample_with_lan", lambda *a, **k: calls.append(1))
    again = evaluate(compose("evaluate", *overrides))
    assert again["generated"] == 0 and again["reused"] == 6 and not calls

    # The key of a model without LAN is the one it had before LAN existed: no "lan" in its identity.
    plan = build_plan(compose("evaluate", *overrides))
    spec = plan.models["hg"]
    sha = file_sha256(lora_file)
    assert spec.identity() == {"adapter_sha256": sha, "lora_scale": 1.0, "unet_sha256": None,
                               "conditioner_sha256": None}
    backbone_node = OmegaConf.to_container(compose("evaluate").backbone, resolve=True)
    before_lan = {"backbone": backbone_node, "adapter_sha256": sha, "lora_scale": 1.0,
                  "sampler": {"scheduler": "ddim", "eta": 0.0}, "num_inference_steps": 2, "guidance_scale": 7.5,
                  "negative_prompt": ""}
    assert generation_settings(plan, spec, backbone_node) == before_lan
    assert settings_key(before_lan) == hg_key
    base_settings = generation_settings(plan, plan.models["base"], backbone_node)
    assert set(base_settings) == {"backbone", "adapter_sha256", "lora_scale", "sampler", "num_inference_steps",
                                  "guidance_scale", "negative_prompt"}
    assert settings_key(base_settings) in keys["base"]


# ------------------------------------------------------------------------------------------- (d) recorded settings
def test_a_run_folder_supplies_its_recorded_lora_scale_and_an_explicit_value_wins(random_lora_dir, lora_file, tmp_path):
    from omegaconf import OmegaConf

    from alignment.runs import parse_models, resolve_path

    run = lora_run(tmp_path, random_lora_dir, {"lora_scale": 0.5, "lan": False})
    assert resolve_path(str(run), "m", "adapter").lora_scale == 0.5
    assert resolve_path(str(run), "m", "adapter", lora_scale=1.0).lora_scale == 1.0
    assert resolve_path(str(lora_file), "m", "adapter").lora_scale == 1.0           # a LoRA file records nothing
    assert resolve_path(str(run / "lora"), "m", "adapter").lora_scale == 1.0
    models = parse_models(OmegaConf.create({"run": {"run": str(run)}, "named": {"adapter": str(run)},
                                            "explicit": {"run": str(run), "lora_scale": 0.8},
                                            "null": {"run": str(run), "lora_scale": None}}))
    assert {m: s.lora_scale for m, s in models.items()} == {"run": 0.5, "named": 0.5, "explicit": 0.8, "null": 0.5}
    assert models["run"].describe()["lora_scale"] == 0.5 and models["run"].identity()["lora_scale"] == 0.5

    # generate: the recorded scale is the one used and recorded, and gives the images of that scale given by hand
    rows = generate(tmp_path / "recorded", f"adapter={run}")
    assert [r["lora_scale"] for r in rows] == [0.5, 0.5]
    generate(tmp_path / "by_hand", f"adapter={lora_file}", "lora_scale=0.5")
    assert same(pixels(tmp_path / "recorded"), pixels(tmp_path / "by_hand"))
    rows = generate(tmp_path / "explicit", f"adapter={run}", "lora_scale=1.0")
    assert [r["lora_scale"] for r in rows] == [1.0, 1.0]


def test_a_recorded_lan_is_the_default_and_an_explicit_lan_wins(random_lora_dir, tmp_path):
    from omegaconf import OmegaConf

    from alignment.runs import parse_models, resolve_path

    run = lora_run(tmp_path, random_lora_dir, {"lora_scale": 0.5, "lan": True})
    assert resolve_path(str(run), "m", "adapter").lan is True
    assert resolve_path(str(run), "m", "adapter", lan=False).lan is False
    models = parse_models(OmegaConf.create({"recorded": {"run": str(run)}, "off": {"run": str(run), "lan": False}}))
    assert models["recorded"].lan is True and models["off"].lan is False
    # a top-level lan overrides the recorded one; a model's own lan overrides the top level
    models = parse_models(OmegaConf.create({"a": {"run": str(run)}, "b": {"run": str(run), "lan": True},
                                            "base": None}), lan=False)
    assert (models["a"].lan, models["b"].lan, models["base"].lan) == (False, True, False)
    assert models["b"].identity()["lan"] is True and "lan" not in models["a"].identity()


def test_hg_dpo_runs_record_scale_half_and_lan_off(tmp_path):
    """``method=hg_dpo`` holds ``inference: {lora_scale: 0.5, lan: false}``; the run-config checks know the key and
    its types (a typo fails before training)."""
    from alignment.runs import recorded_inference
    from alignment.training.schema import check_run_config

    cfg = compose("config", "method=hg_dpo")
    check_run_config(cfg)  # method.inference is a known method key
    assert OmegaConf.to_container(cfg.method.inference) == {"lora_scale": 0.5, "lan": False}
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(
        {"method": OmegaConf.to_container(cfg.method, resolve=True)})))
    assert recorded_inference(tmp_path, "models.hg") == {"lora_scale": 0.5, "lan": False}
    with pytest.raises(ConfigError, match=r"^method\.inference\.lan must be .*, got 'maybe'$"):
        check_run_config(compose("config", "method=hg_dpo", "method.inference.lan=maybe"))
    with pytest.raises(ConfigError, match=r"^method\.inference\.scale: unknown key \(accepted: lan, lora_scale\)$"):
        check_run_config(compose("config", "method=hg_dpo", "+method.inference.scale=0.5"))


# ------------------------------------------------------------------------------------------- (e) bad input
@pytest.mark.parametrize("overrides, start", [
    (["+models.x.lan=maybe"], "models.x.lan must be true or false, got 'maybe'"),
    (["+models.x.lan=1"], "models.x.lan must be true or false, got 1"),
    (["lan=maybe"], "lan must be true or false, got 'maybe'"),
    (["+models.x.lora_scale=high"], "models.x.lora_scale must be a number, got 'high'"),
])
def test_bad_lan_is_one_line_naming_the_key(lora_file, tmp_path, overrides, start):
    from alignment.evaluation.plan import build_plan

    with pytest.raises(ConfigError) as err:
        build_plan(compose("evaluate", f"output_dir={tmp_path}", f"+models.x.adapter={lora_file}", *overrides))
    message = str(err.value)
    assert message.startswith(start) and "\n" not in message, message


def test_bad_generate_lan_and_recorded_settings_are_one_line(random_lora_dir, tmp_path):
    from alignment.generate import generate as run_generate
    from alignment.runs import resolve_path

    with pytest.raises(ConfigError, match=r"^lan must be true or false, got 'yes please'$"):
        run_generate(compose("generate", "prompt=x", f"out_dir={tmp_path / 'out'}", "lan='yes please'"))
    run = lora_run(tmp_path, random_lora_dir, {"lora_scale": "half"})
    with pytest.raises(ConfigError) as err:
        resolve_path(str(run), "m", "models.m")
    message = str(err.value)
    assert message.startswith("models.m: ") and "method.inference.lora_scale must be a number" in message
    assert str(run / "config.yaml") in message and "\n" not in message


# ------------------------------------------------------------------------------------------- (f) full UNet
def test_lan_on_a_full_unet_run_uses_the_original_unet_as_target(tmp_path):
    from alignment.runs import load_unet
    from alignment.sampling.lan import sample_with_lan
    from alignment.sampling.sample import sample_images

    run = tmp_path / "full_run"
    unet = tiny_backbone().unet
    torch.manual_seed(1)
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.02 * torch.randn_like(param))
    unet.save_pretrained(run / "unet")
    write_config(run, {"lan": True})  # recorded: the default of this model

    rows = generate(tmp_path / "lan", f"adapter={run}")
    assert [(r["lan"], r["run"]) for r in rows] == [(True, str(run.absolute()))] * 2
    generate(tmp_path / "plain", f"adapter={run}", "lan=false")  # explicit wins

    backbone = tiny_backbone()
    original = backbone.unet
    backbone.unet = load_unet(backbone, run / "unet", "adapter")
    expected = sample_with_lan(backbone, [PROMPT] * 2, [0, 1], target_unet=original, **SAMPLING)
    plain = sample_images(backbone, [PROMPT] * 2, [0, 1], **SAMPLING)
    assert same(pixels(tmp_path / "lan"), as_arrays(expected))
    assert same(pixels(tmp_path / "plain"), as_arrays(plain))
    assert not same(as_arrays(expected), as_arrays(plain))


# ------------------------------------------------------------------------------------------- conditioner
class ScaleConditioner(Conditioner):
    """A stand-in value conditioner: the prompt embedding scaled by ``1 + value`` (value 0: the text alone)."""

    extras = ("value",)

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.ones(1))

    def forward(self, backbone, prompts, extras, prompt_cond):
        values = torch.tensor([float(v or 0.0) for v in extras["value"]]).view(-1, 1, 1)
        hidden = prompt_cond["encoder_hidden_states"]
        return {**prompt_cond, "encoder_hidden_states": hidden * (1 + values.to(hidden)) * self.anchor}


def test_lan_with_a_conditioner_targets_the_text_conditioned_base_model(tmp_path):
    """The policy is conditioned by the conditioner, the target by the text encoder alone: a prompt whose value
    leaves the text conditioning as it is gets the plain base image; another value gets LAN's image."""
    from alignment.sampling.sample import sample_images

    run = tmp_path / "value_run"
    ScaleConditioner().save_pretrained(run / "conditioner")
    write_config(run, None)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT, "value": 0.0}) + "\n"
                       + json.dumps({"prompt": PROMPT, "value": 2.0}) + "\n")
    common = [f"prompts={prompts}", "seeds=[0]", "num_inference_steps=3", "guidance_scale=3.0", "sampler=dpmsolver",
              "grid=false", f"adapter={run}"]
    from alignment.generate import generate as run_generate

    run_generate(compose("generate", *common, "lan=true", f"out_dir={tmp_path / 'lan'}"))
    run_generate(compose("generate", *common, f"out_dir={tmp_path / 'plain'}"))
    rows = [json.loads(line) for line in (tmp_path / "lan" / "index.jsonl").read_text().splitlines()]
    assert [(r["lan"], r["extras"]) for r in rows] == [(True, {"value": 0.0}), (True, {"value": 2.0})]

    def image(folder, i):
        return np.asarray(Image.open(tmp_path / folder / f"{i:05d}_seed0.png").convert("RGB"), dtype=np.int16)

    base = as_arrays(sample_images(tiny_backbone(), [PROMPT], [0], **SAMPLING))[0]
    assert np.abs(image("lan", 0) - base).max() <= 1       # value 0: LAN against itself (float rounding only)
    assert np.array_equal(image("plain", 0), base)
    assert not np.array_equal(image("lan", 1), image("plain", 1))
