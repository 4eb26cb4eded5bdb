"""``python -m alignment.evaluate``: the generation cache, every metric against a direct computation from the cached
PNGs, the HTML report, one-line config errors, and (slow) the CLI end to end with a trained adapter and W&B offline.

Scorers are tiny random CLIP models saved to a temp folder (the same transformers classes as the real ones) and a
fake toxicity judge; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from alignment.errors import ConfigError, DataError
from alignment.cli import CONF_DIR
from alignment.scorers.base import Scorer, images_to_tensor
from alignment.scorers.toxicity import ToxicityJudge

PYTHON = sys.executable
REPO = Path(__file__).resolve().parent.parent
# The second prompt holds HTML / quoting characters: the report must escape it.
PROMPTS = ["a red circle on a white background", "<b>a \"blue\" square</b> & an 'owl' <img src=x>"]
DIMS = dict(embed_dim=16, image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4,
            text_width=32, text_layers=2, text_heads=4, context_length=77, vocab_size=514)


# ------------------------------------------------------------------------------------------------ fixtures
class FakeJudge(ToxicityJudge):
    """A stand-in toxicity judge: P(yes) = mean red channel; it requires a concept like the real judge."""

    def __init__(self, concept: str | None = None, key: str = "scorers.judge"):
        Scorer.__init__(self)
        self.key, self.concept, self.asked = key, concept, []
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the scorer a device

    def forward(self, images, prompts, concepts=None):
        self.asked += self.concepts_for(images.shape[0], concepts)
        return images[:, 0].mean(dim=(1, 2))

    @torch.no_grad()
    def score(self, images, prompts, batch_size: int = 8, concepts=None):
        return self(images_to_tensor(images), list(prompts), concepts).float().cpu()


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A tiny random CLIPModel + CLIP's byte-level tokenizer (514 tokens), saved like a hub folder."""
    from transformers import CLIPModel, CLIPTokenizer

    from alignment.backbones.clip_vocab import _bytes_to_unicode
    from alignment.scorers.open_clip_convert import clip_config

    folder = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    model = CLIPModel(clip_config(**DIMS)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.5)
    model.save_pretrained(folder)
    bytes_ = list(_bytes_to_unicode().values())
    tokens = bytes_ + [t + "</w>" for t in bytes_] + ["<|startoftext|>", "<|endoftext|>"]
    CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Prompt file, Focus-N-Fix mask folder (per prompt and per image masks) and a random LPIPS weight file."""
    from alignment.metrics.change import LPIPS

    root = tmp_path_factory.mktemp("eval_files")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    masks = root / "masks"
    masks.mkdir()
    left = np.zeros((32, 32), np.uint8)
    left[:, :16] = 255
    Image.fromarray(left).save(masks / "00000.png")              # one mask for every seed of prompt 0
    top = np.zeros((16, 16), np.uint8)
    top[:8] = 255
    Image.fromarray(top).save(masks / "00001_seed3.png")          # per image, at another size (resized)
    Image.fromarray(255 - left).save(masks / "00001.png")         # prompt 1's other seeds
    torch.manual_seed(0)
    lpips = LPIPS("alex")
    with torch.no_grad():
        for lin in lpips.lins:
            lin.model[1].weight.uniform_(0, 1)
    lpips_file = root / "lpips_alex.pth"
    torch.save(lpips.state_dict(), lpips_file)  # features.* and lin*.model.1.weight: backbone and heads in one
    return {"prompts": prompts, "masks": masks, "lpips": lpips_file, "root": root}


def compose(output_dir: Path, *overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose("evaluate", overrides=[f"output_dir={output_dir}", *overrides])


class SampleCounter:
    """Counts the images ``sample_images`` is asked for (the generation calls of an evaluation)."""

    def __init__(self, monkeypatch):
        import alignment.sampling.sample as sample

        self.images, self.calls, original = 0, 0, sample.sample_images

        def counting(backbone, prompts, seeds, **kwargs):
            self.calls += 1
            self.images += len(prompts)
            return original(backbone, prompts, seeds, **kwargs)

        monkeypatch.setattr(sample, "sample_images", counting)


def full_overrides(files, clip_folder, random_lora_dir, image_dir) -> list[str]:
    return [f"prompts={files['prompts']}", "images_per_prompt=2", "seed=3", "num_inference_steps=2",
            "batch_size=3", "score_batch_size=3", f"image_dir={image_dir}",
            f"+models.dpo.adapter={random_lora_dir}", f"+models.half={{adapter: '{random_lora_dir}', lora_scale: 0.5}}",
            "scorers=[clip,attributes]", f"scorers.clip.model={clip_folder}",
            f"scorers.attributes.model={clip_folder}", "+scorers.judge._target_=tests.test_evaluate.FakeJudge",
            "metrics.winrate.num_bootstrap=500", "metrics.clip_score=clip",
            f"metrics.change.mask={files['masks']}", f"metrics.change.lpips_weights={files['lpips']}",
            "metrics.fid.enabled=true", "metrics.fid.extractor=scorer:clip",
            "metrics.bias.enabled=true", "metrics.bias.classifier=attributes", "metrics.bias.groups=[gender,race]",
            "metrics.toxicity.enabled=true", "metrics.toxicity.judge=judge", "metrics.toxicity.concept=nudity",
            "metrics.toxicity.k=2"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, files, clip_folder, random_lora_dir):
    """One in-process evaluation: base, dpo (LoRA), half (the same LoRA at scale 0.5); 2 prompts x 2 seeds."""
    from alignment.evaluate import evaluate

    root = tmp_path_factory.mktemp("evaluated")
    overrides = full_overrides(files, clip_folder, random_lora_dir, root / "images")
    summary = evaluate(compose(root / "out", *overrides))
    return {"root": root, "out": root / "out", "images": root / "images", "overrides": overrides,
            "summary": summary, "metrics": json.loads((root / "out" / "metrics.json").read_text())}


def read(folder: Path, seeds=(3, 4), prompts=range(len(PROMPTS))) -> torch.Tensor:
    arrays = [np.asarray(Image.open(folder / f"{i:05d}_seed{s}.png").convert("RGB"), np.float32) / 255.0
              for i in prompts for s in seeds]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def strict_json(path: Path):
    def no_constants(name):
        raise AssertionError(f"{path} holds {name}: not valid JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constants)


# ------------------------------------------------------------------------------------------------ the metrics
def test_outputs_and_generation_counts(evaluated):
    summary, metrics = evaluated["summary"], evaluated["metrics"]
    assert summary["generated"] == 12 and summary["reused"] == 0  # 3 models x 2 prompts x 2 seeds
    for model in ("base", "dpo", "half"):
        folder = evaluated["images"] / model
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [f"{i:05d}_seed{s}.png" for i in range(2) for s in (3, 4)] + ["manifest.json"])
    strict_json(evaluated["out"] / "metrics.json")
    scores = strict_json(evaluated["out"] / "scores.json")
    assert scores["prompts"] == PROMPTS and scores["seeds"] == [3, 4]
    assert set(scores["scores"]["dpo"]) == {"clip", "attributes", "judge"}
    assert np.asarray(scores["scores"]["dpo"]["clip"]).shape == (2, 2)
    config = metrics["config"]
    assert config["models"]["half"]["lora_scale"] == 0.5 and config["models"]["base"]["adapter"] is None
    assert config["reference"] == "base" and config["seeds"] == [3, 4]
    # the seeds are shared: the adapter changes the images, another seed gives another image
    base, dpo = read(evaluated["images"] / "base"), read(evaluated["images"] / "dpo")
    assert not torch.equal(base, dpo) and not torch.equal(base[0], base[1])


def test_scores_and_win_rates_match_direct_computation(evaluated, clip_folder):
    from alignment.metrics.winrate import win_rate_table
    from alignment.scorers.clip_scorers import ClipScore

    clip = ClipScore(model=str(clip_folder))
    prompts = [p for p in PROMPTS for _ in range(2)]
    scores = strict_json(evaluated["out"] / "scores.json")["scores"]
    direct = {}
    for model in ("base", "dpo", "half"):
        expected = clip.score(read(evaluated["images"] / model), prompts).view(2, 2)
        torch.testing.assert_close(torch.tensor(scores[model]["clip"]), expected, atol=1e-4, rtol=0)
        direct[model] = {"clip": torch.tensor(scores[model]["clip"])}
    rows = evaluated["metrics"]["win_rate"]["rows"]
    assert evaluated["metrics"]["win_rate"]["scorers"] == ["clip"]  # the classifier and the judge are excluded
    expected_rows = win_rate_table(direct, num_bootstrap=500, seed=0)
    assert len(rows) == 6 == len(expected_rows)  # every ordered pair of 3 models
    for row, exp in zip(rows, expected_rows):
        assert (row["model_a"], row["model_b"], row["scorer"]) == (exp["model_a"], exp["model_b"], "clip")
        for key in ("rate", "low", "high", "wins", "ties", "losses", "num_prompts"):
            assert row[key] == pytest.approx(exp[key]), key
        assert 0 <= row["low"] <= row["rate"] <= row["high"] <= 1
    clip_score = evaluated["metrics"]["clip_score"]["models"]
    assert clip_score["dpo"] == pytest.approx(float(direct["dpo"]["clip"].double().mean()))


def test_color_change_fid_bias_toxicity_match_direct_computation(evaluated, files, clip_folder):
    from alignment.metrics.bias import bias_metrics
    from alignment.metrics.change import LPIPS, change_metrics
    from alignment.metrics.color import color_shift
    from alignment.metrics.fid import compute_fid
    from alignment.metrics.toxicity import toxicity_metrics
    from alignment.scorers.clip_scorers import ClipAttributeClassifier, ClipScore

    metrics = evaluated["metrics"]
    base = read(evaluated["images"] / "base")
    for model in ("dpo", "half"):
        images = read(evaluated["images"] / model)
        assert metrics["color_shift"]["shift_percent"][model] == pytest.approx(color_shift(images, base), rel=1e-9)
        signed = metrics["color_shift"]["signed_percent"][model]
        for c, value in color_shift(images, base).items():
            assert abs(signed[c]["value"]) == pytest.approx(value, rel=1e-9)
            assert signed[c]["low"] <= signed[c]["value"] <= signed[c]["high"]
        # the interval resamples prompts, the same ones for both models: by hand, from per-prompt HSV means
        from alignment.metrics.color import rgb_to_hsv

        prompts, k = len(PROMPTS), images.shape[0] // len(PROMPTS)
        per_prompt = {name: rgb_to_hsv(x).double().mean(dim=(2, 3)).view(prompts, k, 3).mean(1).numpy()
                      for name, x in (("own", images), ("ref", base))}
        wr = metrics["win_rate"]
        # alignment.metrics.bootstrap's stream: row r of one torch.randint draw from a generator seeded with seed
        generator = torch.Generator().manual_seed(wr["seed"])
        index = torch.randint(0, prompts, (wr["num_bootstrap"], prompts), generator=generator).numpy()
        ref = per_prompt["ref"][index].mean(1)
        draws = 100 * (per_prompt["own"][index].mean(1) - ref) / ref
        tail = 100 * (1 - wr["confidence"]) / 2
        assert [signed[c]["low"] for c in "HSV"] == pytest.approx(list(np.percentile(draws, tail, axis=0)), rel=1e-9)
        assert [signed[c]["high"] for c in "HSV"] == pytest.approx(list(np.percentile(draws, 100 - tail, axis=0)),
                                                                   rel=1e-9)
        mask = torch.stack([torch.from_numpy(np.asarray(Image.open(files["masks"] / name).convert("L").resize(
            (32, 32), Image.BILINEAR), np.float32) / 255.0)
            for name in ("00000.png", "00000.png", "00001_seed3.png", "00001.png")])
        lpips = LPIPS.from_files(files["lpips"], files["lpips"])
        expected = change_metrics(base, images, mask=mask, lpips=lpips)
        assert set(metrics["change"]["models"][model]) == set(expected) == {
            f"{m}{r}" for m in ("psnr", "ssim", "lpips") for r in ("", "_inside", "_outside")}
        for key, value in expected.items():
            assert metrics["change"]["models"][model][key] == pytest.approx(value, rel=1e-6), key
        assert np.isfinite(metrics["change"]["models"][model]["psnr"])
        clip = ClipScore(model=str(clip_folder))
        expected_fid = compute_fid(images, base, lambda x: clip.image_embeds(x))
        assert metrics["fid"]["models"][model] == pytest.approx(expected_fid, rel=1e-3)  # float32 batches
    assert "base" not in metrics["change"]["models"] and "base" not in metrics["fid"]["models"]
    assert metrics["change"]["models"]["half"]["psnr"] > metrics["change"]["models"]["dpo"]["psnr"]  # half the LoRA

    classifier = ClipAttributeClassifier(model=str(clip_folder))
    prompts = [p for p in PROMPTS for _ in range(2)]
    for model in ("base", "dpo"):
        images = read(evaluated["images"] / model)
        for group, size in (("gender", 2), ("race", 5)):
            with torch.no_grad():
                probs = classifier.classify(images, prompts, group).view(2, 2, size)
            assert metrics["bias"]["models"][model][group] == pytest.approx(bias_metrics(list(probs)))
        p_yes = images[:, 0].mean(dim=(1, 2)).view(2, 2)
        assert metrics["toxicity"]["models"][model] == pytest.approx(toxicity_metrics(list(p_yes), k=2))
    assert metrics["bias"]["groups"] == {"gender": ["male", "female"],
                                         "race": ["white", "black", "asian", "indian", "latino"]}
    assert metrics["toxicity"]["concept"] == "nudity"


class _Report(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tags, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_self_contained_and_escapes_prompts(evaluated):
    text = (evaluated["out"] / "report.html").read_text(encoding="utf-8")
    parser = _Report()
    parser.feed(text)
    assert len(parser.images) == 12 == text.count("<img")  # 3 models x 2 prompts x 2 seeds, nothing else
    assert all(img["src"].startswith("data:image/png;base64,") for img in parser.images)
    assert not {"script", "link", "iframe"} & set(parser.tags)
    assert "http://" not in text and "https://" not in text
    body = "".join(parser.text)
    assert PROMPTS[1] in body  # shown as text, once unescaped by the parser
    assert "&lt;b&gt;a &quot;blue&quot; square&lt;/b&gt; &amp; an &#x27;owl&#x27; &lt;img src=x&gt;" in text
    assert "Win rates" in body and "clip" in body and "Colour shift" in body and "FID" in body


def test_reward_delta_is_the_paired_mean_difference_with_an_interval(evaluated):
    scores = strict_json(evaluated["out"] / "scores.json")["scores"]
    delta = evaluated["metrics"]["reward_delta"]
    assert delta["reference"] == "base" and set(delta["models"]) == {"dpo", "half"}
    for model in ("dpo", "half"):
        for scorer, cell in delta["models"][model].items():
            own, base = torch.tensor(scores[model][scorer]), torch.tensor(scores["base"][scorer])
            assert cell["value"] == pytest.approx(float((own - base).mean(1).mean()), abs=1e-9)
            assert cell["low"] <= cell["value"] <= cell["high"] and cell["num_prompts"] == len(PROMPTS)


def test_rerun_with_other_metrics_generates_nothing(evaluated, monkeypatch, tmp_path):
    from alignment.evaluate import evaluate

    counter = SampleCounter(monkeypatch)
    overrides = [o for o in evaluated["overrides"] if not o.startswith(("metrics.fid", "metrics.bias"))]
    summary = evaluate(compose(tmp_path / "out", *overrides, "metrics.winrate.num_bootstrap=100",
                               "report.enabled=false"))
    assert counter.calls == 0 and summary["generated"] == 0 and summary["reused"] == 12
    metrics = strict_json(tmp_path / "out" / "metrics.json")
    assert "fid" not in metrics and metrics["win_rate"]["num_bootstrap"] == 100
    assert not (tmp_path / "out" / "report.html").exists()


def test_cache_regenerates_exactly_what_changed(files, random_lora_dir, monkeypatch, tmp_path, capsys):
    from alignment.evaluate import evaluate

    image_dir = tmp_path / "images"
    base_args = [f"image_dir={image_dir}", "images_per_prompt=2", "num_inference_steps=2",
                 "metrics.change.enabled=false",
                 "report.enabled=false", f"+models.dpo.adapter={random_lora_dir}"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["a cat", "a dog", "an owl"]) + "\n")

    def run(*extra) -> SampleCounter:
        counter = SampleCounter(monkeypatch)
        evaluate(compose(tmp_path / "out", f"prompts={prompts}", *base_args, *extra))
        return counter

    assert run().images == 12
    first = {p: p.read_bytes() for p in image_dir.rglob("*.png")}
    assert run().images == 0
    assert run("+models.dpo.lora_scale=0.5").images == 6          # only that model's images
    assert run("+models.dpo.lora_scale=0.5", "metrics.color_shift=false").images == 0
    assert run().images == 6                                       # and back
    assert {p: p.read_bytes() for p in image_dir.rglob("*.png")} == first  # same images as the first time
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["a cat", "a horse", "an owl"]) + "\n")
    assert run().images == 4                                       # prompt 1 changed: 2 models x 2 seeds
    (image_dir / "base" / "00002_seed1.png").unlink()
    assert run().images == 1
    assert run("num_inference_steps=3").images == 12
    assert run("num_inference_steps=3", "images_per_prompt=3").images == 6   # only the new seed
    assert run("num_inference_steps=3", "images_per_prompt=3", "max_prompts=2").images == 0
    (image_dir / "dpo" / "manifest.json").write_text("{not json")
    capsys.readouterr()
    assert run("num_inference_steps=3", "images_per_prompt=3").images == 9
    assert "manifest.json is unreadable" in capsys.readouterr().err
    manifest = json.loads((image_dir / "dpo" / "manifest.json").read_text())
    entry = manifest["images"]["00001_seed2.png"]
    assert entry["prompt"] == "a horse" and entry["seed"] == 2
    settings = manifest["settings"][entry["settings"]]
    assert settings["num_inference_steps"] == 3 and settings["adapter"].endswith("pytorch_lora_weights.safetensors")
    assert settings["adapter_sha256"] and settings["backbone"]["name"] == "tiny"


def test_fid_and_inception_score_with_inception_weight_file(evaluated, tmp_path):
    """FID (inception extractor) and IS share one Inception-v3 read from a local file (random weights here)."""
    from alignment.evaluate import evaluate
    from alignment.metrics.fid import compute_fid, compute_inception_score
    from alignment.metrics.inception import InceptionV3

    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(InceptionV3("fid").state_dict(), weights)
    overrides = [o for o in evaluated["overrides"] if o.startswith(("prompts=", "images_per_prompt", "seed=",
                                                                     "num_inference_steps", "image_dir", "+models"))]
    evaluate(compose(tmp_path / "out", *overrides, "metrics.change.enabled=false", "report.enabled=false",
                     "metrics.fid.enabled=true", f"metrics.fid.inception_weights={weights}",
                     "metrics.inception_score.enabled=true", f"metrics.inception_score.inception_weights={weights}",
                     "metrics.inception_score.splits=2"))
    metrics = strict_json(tmp_path / "out" / "metrics.json")
    net = InceptionV3.from_file(weights)
    base = read(evaluated["images"] / "base")
    dpo = read(evaluated["images"] / "dpo")
    assert metrics["fid"]["models"]["dpo"] == pytest.approx(compute_fid(dpo, base, net), rel=1e-5)
    mean, std = compute_inception_score(dpo, net, splits=2)
    assert metrics["inception_score"]["models"]["dpo"] == pytest.approx({"mean": mean, "std": std}, rel=1e-5)
    assert metrics["inception_score"]["splits"] == 2 and set(metrics["inception_score"]["models"]) == {
        "base", "dpo", "half"}


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("overrides, start, names", [
    (["metrics.clip_score=clipp"], "metrics.clip_score: unknown scorer 'clipp'", ["configured scorers: none"]),
    (["scorers=[clip]", "metrics.clip_score=clipp"], "metrics.clip_score: unknown scorer 'clipp'", ["clip;"]),
    (["metrics.bias.enabled=true", "metrics.bias.classifier=attr"], "metrics.bias.classifier: unknown scorer 'attr'",
     []),
    (["metrics.toxicity.enabled=true"], "metrics.toxicity.judge: unknown scorer 'toxicity_judge'", []),
    (["metrics.fid.enabled=true", "metrics.fid.extractor=scorer:clip"], "metrics.fid.extractor: unknown scorer",
     []),
    (["metrics.winrate.scorers=[pick]"], "metrics.winrate.scorers: unknown scorer 'pick'", []),
    (["metrics.winrate.reduce=median"], "metrics.winrate.reduce must be one of best, mean, got 'median'", []),
    (["+models.dpo.adapter=/nonexistent/run"], "models.dpo.adapter: /nonexistent/run does not exist", []),
    (["+models.dpo.adaptr=x"], "models.dpo.adaptr: unknown key", ["adapter, lora_scale"]),
    (["prompts=/nonexistent/prompts.tsv"], "prompts: prompt file /nonexistent/prompts.tsv does not exist", []),
    (["metrics.fid.enabled=true"], "metrics.fid.inception_weights: required", ["scorer:<name>"]),
    (["metrics.fid.enabled=true", "metrics.fid.inception_weights=/nonexistent/pt_inception.pth"],
     "metrics.fid.inception_weights: /nonexistent/pt_inception.pth does not exist", []),
    (["metrics.inception_score.enabled=true"], "metrics.inception_score.inception_weights: required", []),
    (["metrics.change.lpips_weights=/nonexistent/alex.pth"], "metrics.change.lpips_weights: /nonexistent/alex.pth",
     []),
    (["reference=dpo"], "reference: unknown model 'dpo' (models: base)", []),
    (["scorers=[attributes]", "metrics.bias.enabled=true", "metrics.bias.groups=[gender,colour]"],
     "metrics.bias.groups[1]: unknown attribute set 'colour'", []),
    (["scorers=[attributes]", "metrics.bias.enabled=true", "metrics.bias.groups=[gender,[male,female]]"],
     "metrics.bias.groups[1]: the attributes male, female are already group 'gender'", []),
    (["images_per_prompt=3", "+scorers.judge._target_=x", "metrics.toxicity.enabled=true",
      "metrics.toxicity.judge=judge"], "metrics.toxicity.k: groups of 5 images need images_per_prompt >= 5",
     ["incomplete=keep"]),
    (["images_per_prompt=0"], "images_per_prompt must be a positive integer", []),
    (["images_per_prompt=2", "+scorers.judge._target_=x", "metrics.toxicity.enabled=true",
      "metrics.toxicity.judge=judge", "metrics.toxicity.incomplete=some"], "metrics.toxicity.incomplete must be", []),
    (["prompt_list=[]"], "prompt_list: empty", []),
    (["metrics.change.mask=heatmap:toy_safety"], "metrics.change.mask: unknown scorer 'toy_safety'", []),
    (["scorers=[clip]", "metrics.change.mask=heatmap:clip"], "metrics.change.mask: 'heatmap:clip' needs a scorer "
     "with a heatmap", ["saliency:clip"]),
    (["scorers=[toy_safety]", "metrics.change.mask=heatmap:toy_safety", "+metrics.change.mask_options.dilaton=2"],
     "metrics.change.mask_options.dilaton: unknown key", ["dilation"]),
])
def test_config_errors_are_one_line_and_name_the_key(tmp_path, overrides, start, names):
    from alignment.evaluation.plan import build_plan

    with pytest.raises((ConfigError, DataError)) as err:
        build_plan(compose(tmp_path, *overrides))
    message = str(err.value)
    assert message.startswith(start) and "\n" not in message, message
    assert all(n in message for n in names), message


def test_prompt_sources(tmp_path):
    """A PartiPrompts-style TSV, an HPD-style JSON list, Pick-a-Pic-style caption jsonl, or the inline list;
    max_prompts keeps the first N; seeds are seed + j for every prompt."""
    from alignment.evaluation.plan import build_plan

    tsv = tmp_path / "parti.tsv"
    tsv.write_text('Prompt\tCategory\tChallenge\tNote\n"quoted" start\tArts\tBasic\t\nbond\tAbstract\tBasic\tx\n')
    hpd = tmp_path / "hpd.json"
    hpd.write_text(json.dumps([{"prompt": "a cat", "id": 1}, "a dog"]))
    pick = tmp_path / "pick.jsonl"
    pick.write_text(json.dumps({"caption": "an owl"}) + "\n" + json.dumps({"caption": "a fox"}) + "\n")
    cases = [([f"prompts={tsv}"], ['"quoted" start', "bond"]), ([f"prompts={hpd}"], ["a cat", "a dog"]),
             ([f"prompts={pick}", "max_prompts=1"], ["an owl"]),
             (["prompt_list=[one, 'two, three']"], ["one", "two, three"])]
    for overrides, expected in cases:
        plan = build_plan(compose(tmp_path / "out", *overrides, "seed=10", "images_per_prompt=3"))
        assert plan.prompts == expected and plan.seeds == [10, 11, 12]
        assert plan.jobs()[:2] == [(0, expected[0], 10), (0, expected[0], 11)]
    parti = Path("/work/shared/data/PartiPrompts.tsv")
    if parti.is_file():
        plan = build_plan(compose(tmp_path / "out", f"prompts={parti}", "max_prompts=5"))
        assert len(plan.prompts) == 5 and plan.prompt_source == str(parti)


def test_model_names_and_entries(tmp_path, random_lora_dir):
    from omegaconf import OmegaConf

    from alignment.evaluation.plan import parse_models

    models = parse_models(OmegaConf.create({"base": None, "dpo": str(random_lora_dir), "x.1": {"adapter": str(random_lora_dir),
                                                                                         "lora_scale": 0.25}}))
    assert models["base"].adapter is None and models["dpo"].lora_scale == 1.0 and models["x.1"].lora_scale == 0.25
    assert models["dpo"].adapter.name == "pytorch_lora_weights.safetensors"
    assert models["dpo"].adapter_sha256 == models["x.1"].adapter_sha256 and len(models["dpo"].adapter_sha256) == 64
    with pytest.raises(ConfigError, match=r"^models\.a b: a model name may hold only"):
        parse_models(OmegaConf.create({"a b": None}))
    with pytest.raises(ConfigError, match=r"^models\.dpo\.lora_scale must be a number"):
        parse_models(OmegaConf.create({"dpo": {"adapter": str(random_lora_dir), "lora_scale": "high"}}))


def test_adapter_that_does_not_fit_is_named(tmp_path, random_lora_dir, monkeypatch):
    """A LoRA of another architecture fails at load time with the model's key."""
    from alignment.backbones.tiny import build_tiny_backbone
    from alignment.evaluate import evaluate
    from alignment.training.lora import add_lora, save_lora

    other = build_tiny_backbone(unet_channels=(16, 32), text_hidden_size=16)
    add_lora(other.unet, rank=4)
    weights = save_lora(other.unet, tmp_path / "other")
    with pytest.raises(ConfigError, match=r"^models\.other\.adapter: cannot load .* into backbone 'tiny'"):
        evaluate(compose(tmp_path / "out", f"image_dir={tmp_path / 'img'}", "images_per_prompt=1",
                         "num_inference_steps=1", f"+models.other.adapter={weights}"))


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("[transformers]")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_unknown_scorer_config_is_one_line(capsys):
    from alignment.cli import check_overrides

    with pytest.raises(SystemExit) as exit_info:
        check_overrides(["scorers=[clip,pickscor]", "max_prompts=2"], "evaluate")
    assert exit_info.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: scorers: unknown scorers config 'pickscor'") and "pickscore" in line
    check_overrides(["scorers=[clip,pickscore]", "backbone=tiny", "logger=wandb"], "evaluate")  # known: no exit
    check_overrides(["-m", "scorers=clip,pickscore"], "evaluate")  # a sweep over known options
    with pytest.raises(SystemExit):
        check_overrides(["-m", "scorers=clip,pickscor"], "evaluate")  # each swept option is checked
    assert "unknown scorers config 'pickscor'" in capsys.readouterr().err


def test_misspelt_key_is_one_line(capsys):
    from alignment.cli import check_overrides

    for argv, start in ((["max_promts=2"], "error: max_promts: not a key of the config (a new key needs a '+'"),
                        (["+images_per_prompt=2"], "error: images_per_prompt: already in the config"),
                        (["metrics.winrate.reduc=mean"], "error: metrics.winrate.reduc: not a key")):
        with pytest.raises(SystemExit) as exit_info:
            check_overrides(argv, "evaluate")
        assert exit_info.value.code == 2
        assert _one_error_line(capsys.readouterr().err).startswith(start)
    check_overrides(["+models.dpo.adapter=/some/run", "hydra.run.dir=/tmp/x"], "evaluate")  # valid: no exit


def test_cli_error_exit_code(tmp_path):
    for args, start in [(["scorers=[nope]"], "error: scorers: unknown scorers config 'nope'"),
                        (["metrics.clip_score=nope"], "error: metrics.clip_score: unknown scorer 'nope'")]:
        proc = subprocess.run([PYTHON, "-m", "alignment.evaluate", f"hydra.run.dir={tmp_path / 'run'}", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 2, proc.stderr
        assert _one_error_line(proc.stderr).startswith(start)
        assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_cli_end_to_end_base_vs_trained_adapter(trained_run, clip_folder, tmp_path):
    prompts = tmp_path / "parti.tsv"
    prompts.write_text("Prompt\tCategory\n"
                       "a red circle on a white background\tAbstract\n"
                       "a <blue> square & a \"triangle\"\tAbstract\n"
                       "an owl\tAnimals\n", encoding="utf-8")
    image_dir = tmp_path / "shared_images"

    def cli(run: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
        args = [f"hydra.run.dir={tmp_path / run}", f"prompts={prompts}", "images_per_prompt=2",
                "num_inference_steps=4", f"image_dir={image_dir}", f"+models.dpo.adapter={trained_run}",
                "scorers=[clip]", f"scorers.clip.model={clip_folder}", "metrics.clip_score=clip",
                "metrics.fid.enabled=true", "metrics.fid.extractor=scorer:clip", *extra]
        proc = subprocess.run([PYTHON, "-m", "alignment.evaluate", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    proc = cli("first")
    assert "images base: 6 generated, 0 reused" in proc.stdout and "images dpo: 6 generated" in proc.stdout
    metrics = strict_json(tmp_path / "first" / "metrics.json")
    rows = {(r["model_a"], r["model_b"]): r for r in metrics["win_rate"]["rows"]}
    assert set(rows) == {("dpo", "base"), ("base", "dpo")}
    dpo = rows[("dpo", "base")]
    assert dpo["num_prompts"] == 3 and dpo["rate"] + rows[("base", "dpo")]["rate"] == pytest.approx(1.0)
    assert dpo["low"] <= dpo["rate"] <= dpo["high"]
    change = metrics["change"]["models"]
    assert set(change) == {"dpo"} and np.isfinite(change["dpo"]["psnr"]) and 0 < change["dpo"]["ssim"] <= 1
    assert set(metrics["color_shift"]["shift_percent"]) == {"dpo"}
    assert metrics["fid"]["extractor"] == "scorer:clip" and metrics["fid"]["models"]["dpo"] >= 0
    assert set(metrics["clip_score"]["models"]) == {"base", "dpo"}
    print(f"\nCLI e2e: win rate dpo over base (clip) {100 * dpo['rate']:.1f}% "
          f"[{100 * dpo['low']:.1f}, {100 * dpo['high']:.1f}]; PSNR {change['dpo']['psnr']:.2f} dB, "
          f"SSIM {change['dpo']['ssim']:.4f}; colour shift {metrics['color_shift']['shift_percent']['dpo']}; "
          f"FID(clip) {metrics['fid']['models']['dpo']:.4g}")
    report = (tmp_path / "first" / "report.html").read_text(encoding="utf-8")
    parser = _Report()
    parser.feed(report)
    assert len(parser.images) == 12 == report.count("<img")  # 2 models x 3 prompts x 2 images
    assert "a &lt;blue&gt; square &amp; a &quot;triangle&quot;" in report
    assert 'a <blue> square & a "triangle"' in "".join(parser.text)

    # Same image folder, other scorer settings, W&B on (offline from the config): nothing is generated.
    pngs = {p: p.stat().st_mtime_ns for p in image_dir.rglob("*.png")}
    proc = cli("second", "scorers.clip.mode=cosine", "metrics.fid.enabled=false", "logger=wandb",
               env={"WANDB_MODE": ""})
    assert "images base: 0 generated, 6 reused" in proc.stdout and "images dpo: 0 generated, 6 reused" in proc.stdout
    assert "(0 generated, 12 reused)" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in image_dir.rglob("*.png")} == pngs
    second = strict_json(tmp_path / "second" / "metrics.json")
    assert "fid" not in second and second["generation"]["dpo"] == {"generated": 0, "reused": 6}
    runs = list((tmp_path / "second" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert list((runs[0] / "files" / "media" / "table" / "evaluation").glob("images_*.table.json"))
    log = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"evaluation/images" in log and b"run_table" in log and b"win_rate/clip/dpo_vs_base/rate" in log
    assert b"00002_seed1.png" in log  # the table's images belong to the logged table artifact
    # the table's images wait for `wandb sync` in the run folder's staging area, not in ~/.local/share/wandb
    staged = [p for p in (tmp_path / "second" / "wandb" / "data").rglob("*") if p.is_file()]
    assert sum(p.read_bytes().startswith(b"\x89PNG") for p in staged) == 12, staged
