"""LiVO inference (docs/methods.md#livo-inference): the value retriever wired into ``alignment.generate`` and
``alignment.evaluate`` — per-image values (the row's value, else the retriever's, then the 0.5 draw for bias values),
value-free images pixel-identical to the base model's, values in index.jsonl / the image cache, and one-line
retriever errors before any model loads. The chat classifier is only ever asked through a local stub server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from alignment.cli import CONF_DIR
from alignment.errors import ConfigError
from alignment.retrieval.values import BIAS_VALUES, GENDER, HORROR, RACE, ValueRetriever
from tests.conftest import run_cli
from tests.test_livo import _write_prompts, livo_run  # noqa: F401 - the tiny LiVO run folder (a module fixture)
from tests.test_value_retriever import _Stub, stub_url  # noqa: F401 - the local chat stub server

pytestmark = pytest.mark.usefixtures("one_thread")

# fruit: no value; doctor: the lexicon's bias value (dropped for some seeds); zombie: a toxicity value (always);
# blue square: the file's bias value (the 0.5 draw applies to it too)
ROWS = [{"prompt": "a bowl of fruit on a table"}, {"prompt": "a photo of a doctor"},
        {"prompt": "a zombie in a field"}, {"prompt": "a blue square on a white background", "value": GENDER}]
SEEDS = [0, 1, 2, 3]


def expected_values(seeds, **settings) -> dict[tuple[int, int], str | None]:
    return ValueRetriever(**settings).image_values([r["prompt"] for r in ROWS], seeds, [r.get("value") for r in ROWS])


def read_index(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]


def png_pixels(path: Path) -> bytes:
    return Image.open(path).convert("RGB").tobytes()


def compose_config(name: str, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


# ------------------------------------------------------------------------------------------------ the values
def test_expected_values_mix_dropped_kept_and_always():
    """The fixture prompts exercise every case (guards the assertions below against a lucky draw)."""
    values = expected_values(SEEDS)
    assert [values[(0, s)] for s in SEEDS] == [None] * 4
    assert {values[(1, s)] for s in SEEDS} == {None, values[(1, 1)]} and values[(1, 1)] in BIAS_VALUES
    assert [values[(2, s)] for s in SEEDS] == [HORROR] * 4
    assert {values[(3, s)] for s in SEEDS} == {None, GENDER}
    assert expected_values(SEEDS) == values                                  # deterministic
    assert all(v is not None for k, v in expected_values(SEEDS, bias_probability=1.0).items() if k[0] != 0)


def test_extras_groups_split_value_free_rows_in_order():
    from alignment.runs import extras_groups

    assert extras_groups(None, 3) == [[0, 1, 2]]
    assert extras_groups({"value": [None, None]}, 2) == [[0, 1]]
    assert extras_groups({"value": [GENDER, RACE]}, 2) == [[0, 1]]
    assert extras_groups({"value": [None, GENDER, None, RACE]}, 4) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="3 values for 2 images"):
        extras_groups({"value": [None, None, None]}, 2)


def test_mixed_batch_value_free_images_equal_the_base(livo_run):  # noqa: F811
    """LoadedModel.sample, the path generate and evaluate share: a value-free image in a batch with valued ones is
    sampled apart, so it gets the base conditioning (without the split it would carry the 1 + 77 pad token)."""
    from alignment.backbones.tiny import build_tiny_backbone
    from alignment.runs import model_loaded, resolve_run
    from alignment.sampling.sample import sample_images

    backbone = build_tiny_backbone(seed=0)
    prompts, seeds = ["a bowl of fruit", "a photo of a doctor", "a red circle"], [0, 1, 2]
    options = dict(num_inference_steps=2, guidance_scale=5.0, negative_prompt="", sampler="ddim")
    base = sample_images(backbone, [prompts[0], prompts[2]], [seeds[0], seeds[2]], **options)
    with model_loaded(backbone, resolve_run(str(livo_run), "livo", "models.livo")) as model:
        mixed = model.sample(prompts, seeds, {"value": [None, GENDER, None]}, **options)
        valued = model.sample(prompts[1:2], seeds[1:2], {"value": [GENDER]}, **options)
        padded = sample_images(backbone, prompts, seeds, conditioner=model.conditioner,
                               extras={"value": [None, GENDER, None]}, **options)   # one batch, no split
    assert torch.equal(mixed[[0, 2]], base)
    assert torch.equal(mixed[1], valued[0])
    assert not torch.equal(padded[[0, 2]], base)       # what the split avoids


# ------------------------------------------------------------------------------------------------ generate
@pytest.mark.slow   # a python -m alignment.* subprocess end to end
def test_generate_with_the_lexicon_retriever(livo_run, tmp_path):  # noqa: F811
    prompts = _write_prompts(tmp_path / "p.jsonl", ROWS)
    out = tmp_path / "images"
    proc = run_cli("alignment.generate", f"prompts={prompts}", "retriever=lexicon", "+models.base=null",
                   f"+models.livo.run={livo_run}", "num_inference_steps=2", f"seeds=[{','.join(map(str, SEEDS))}]",
                   "batch_size=8", "grid=false", f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "retriever (lexicon): 9 of 16 images with a value" in proc.stdout
    expected = expected_values(SEEDS)
    base_rows, livo_rows = read_index(out / "base"), read_index(out / "livo")
    assert all("extras" not in r and "retriever" not in r for r in base_rows)      # the base reads no value
    assert {(r["prompt_index"], r["seed"]): r["extras"]["value"] for r in livo_rows} == expected
    assert livo_rows[0]["retriever"] == {"classifier": "lexicon", "bias_probability": 0.5, "seed": 0}
    differs = 0
    for (i, seed), value in expected.items():
        name = f"{i:05d}_seed{seed}.png"
        same = png_pixels(out / "base" / name) == png_pixels(out / "livo" / name)
        if value is None:
            assert same, f"{name}: a value-free image differs from the base's"
        differs += not same
    assert differs >= 8  # valued images: the value token changes (almost) all of them


@pytest.mark.slow   # a python -m alignment.* subprocess end to end
def test_generate_without_retriever_uses_the_row_value_for_every_seed(livo_run, tmp_path):  # noqa: F811
    prompts = _write_prompts(tmp_path / "p.jsonl", ROWS)
    out = tmp_path / "images"
    proc = run_cli("alignment.generate", f"prompts={prompts}", f"adapter={livo_run}", "num_inference_steps=1",
                   "seeds=[0,3]", "grid=false", f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_index(out)
    assert [r["extras"]["value"] for r in rows] == [None, None, None, None, None, None, GENDER, GENDER]
    assert all("retriever" not in r for r in rows)


# ------------------------------------------------------------------------------------------------ evaluate
class Counter:
    """Counts the images ``sample_images`` is asked for, per call."""

    def __init__(self, monkeypatch):
        import alignment.sampling.sample as sample

        self.images, original = 0, sample.sample_images

        def counting(backbone, prompts, seeds, **kwargs):
            self.images += len(prompts)
            return original(backbone, prompts, seeds, **kwargs)

        monkeypatch.setattr(sample, "sample_images", counting)


def test_evaluate_caches_each_image_with_its_value(livo_run, tmp_path, monkeypatch):  # noqa: F811
    from alignment.evaluate import evaluate

    prompts = _write_prompts(tmp_path / "p.jsonl", ROWS)
    image_dir = tmp_path / "images"

    def run(*extra) -> int:
        counter = Counter(monkeypatch)
        evaluate(compose_config("evaluate", f"output_dir={tmp_path / 'out'}", f"prompts={prompts}",
                                f"+models.livo.run={livo_run}", f"image_dir={image_dir}", "images_per_prompt=2",
                                "seed=0", "num_inference_steps=2", "metrics.change.enabled=false",
                                "report.enabled=false", *extra))
        return counter.images

    def manifest(model: str) -> dict:
        return json.loads((image_dir / model / "manifest.json").read_text())["images"]

    assert run("retriever=lexicon") == 16                                  # 2 models x 4 prompts x 2 seeds
    expected = expected_values([0, 1])
    entries = manifest("livo")
    assert {(e["seed"], e["extras"]["value"]) for e in entries.values()} \
        == {(s, v) for (_, s), v in expected.items()}
    assert all(entries[f"{i:05d}_seed{s}.png"]["extras"] == {"value": v} for (i, s), v in expected.items())
    assert all("extras" not in e for e in manifest("base").values())
    for (i, s), value in expected.items():
        if value is None:   # one evaluation, the same batch composition: pixel-identical to the base
            name = f"{i:05d}_seed{s}.png"
            assert png_pixels(image_dir / "base" / name) == png_pixels(image_dir / "livo" / name), name
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["extras"]["livo"]["value"] == [[expected[(i, s)] for s in (0, 1)] for i in range(len(ROWS))]
    assert "base" not in scores["extras"]
    config = json.loads((tmp_path / "out" / "metrics.json").read_text())["config"]
    assert config["retriever"] == {"classifier": "lexicon", "bias_probability": 0.5, "seed": 0}

    assert run("retriever=lexicon") == 0                                   # unchanged: all reused
    kept = expected_values([0, 1], bias_probability=1.0)
    changed = sum(kept[k] != expected[k] for k in expected)
    assert changed == 2
    assert run("retriever=lexicon", "retriever.bias_probability=1.0") == changed   # only the livo images whose
    assert all(manifest("livo")[f"{i:05d}_seed{s}.png"]["extras"] == {"value": v}  # value changed
               for (i, s), v in kept.items())
    rows = {(i, s): ROWS[i].get("value") for i in range(len(ROWS)) for s in (0, 1)}   # retriever off: the row's
    assert run() == sum(rows[k] != kept[k] for k in kept) == 4


def test_evaluate_with_the_chat_retriever_asks_only_the_local_stub(livo_run, stub_url, tmp_path):  # noqa: F811
    from alignment.evaluation.plan import build_plan

    _Stub.mode = "good"   # answers "racial equality"
    prompts = _write_prompts(tmp_path / "p.jsonl", ROWS)
    plan = build_plan(compose_config("evaluate", f"output_dir={tmp_path / 'out'}", f"prompts={prompts}",
                                     f"+models.livo.run={livo_run}", "images_per_prompt=3", "retriever=chat",
                                     f"retriever.chat.url={stub_url}", "retriever.chat.model=stub"))
    asked = [body["messages"][-1]["content"] for _, body, _ in _Stub.requests]
    assert asked == [ROWS[0]["prompt"], ROWS[1]["prompt"]]   # keyword and file values need no request
    assert {plan.image_values[(1, s)] for s in (0, 1, 2)} <= {None, RACE}
    assert [plan.image_values[(2, s)] for s in (0, 1, 2)] == [HORROR] * 3
    assert plan.retriever["chat"]["url"] == stub_url


# ------------------------------------------------------------------------------------------------ bad settings
@pytest.mark.parametrize("overrides,start", [
    (("retriever=lexicon", "retriever.classifier=oracle"), "retriever.classifier must be one of"),
    (("retriever=lexicon", "retriever.bias_probability=1.5"), "retriever.bias_probability must be in [0, 1]"),
    (("retriever=lexicon", "retriever.seed=x"), "retriever.seed must be an integer"),
    (("retriever=lexicon", "+retriever.colour=red"), "retriever.colour: unknown key"),
    (("retriever=chat",), "retriever.chat.url: set the endpoint"),
    (("retriever=chat", "retriever.chat.url=ftp://host/v1"), "retriever.chat.url must be an http(s) URL"),
    (("retriever=chat", "retriever.chat.url=http://127.0.0.1:9/v1", "retriever.chat.timeout=0"),
     "retriever.chat.timeout must be > 0"),
    (("retriever=chat", "retriever.chat.url=http://127.0.0.1:9/v1", "retriever.chat.on_error=ignore"),
     "retriever.chat.on_error must be one of"),
    (("retriever=chat", "retriever.chat.url=http://127.0.0.1:9/v1", "+retriever.chat.tmeout=3"),
     "retriever.chat.tmeout: unknown key"),
    (("retriever=chat", "retriever.chat.url=http://127.0.0.1:9/v1",
      "retriever.chat.api_key_env=ALIGNMENT_TEST_NO_SUCH_KEY"), "retriever.chat.api_key_env: the environment"),
    (("retriever=zero_shot",), "retriever.zero_shot.model: set the local folder"),
    (("retriever=zero_shot", "retriever.zero_shot.model=/nonexistent/nli"), "retriever.zero_shot.model: '/nonexi"),
    (("retriever=zero_shot", "retriever.zero_shot.model=/tmp", "retriever.zero_shot.threshold=2"),
     "retriever.zero_shot.threshold must be in [0, 1]"),
])
@pytest.mark.parametrize("entry", ["generate", "evaluate"])
def test_bad_retriever_settings_are_one_line_before_any_model(entry, overrides, start, livo_run, tmp_path,  # noqa: F811
                                                              monkeypatch):
    import alignment.config
    import alignment.runs

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the retriever was checked")

    monkeypatch.setattr(alignment.config, "instantiate_checked", no_model)
    monkeypatch.setattr(alignment.runs, "model_loaded", no_model)
    monkeypatch.delenv("ALIGNMENT_TEST_NO_SUCH_KEY", raising=False)
    prompts = _write_prompts(tmp_path / "p.jsonl", ROWS)
    common = (f"prompts={prompts}", f"+models.livo.run={livo_run}", *overrides)
    with pytest.raises(ConfigError) as info:
        if entry == "generate":
            from alignment.generate import generate

            generate(compose_config("generate", f"out_dir={tmp_path / 'out'}", *common))
        else:
            from alignment.evaluation.plan import build_plan

            build_plan(compose_config("evaluate", f"output_dir={tmp_path / 'out'}", *common))
    message = str(info.value)
    assert message.startswith(start) and "\n" not in message, message


def test_unknown_retriever_config_on_the_command_line(tmp_path):
    proc = run_cli("alignment.generate", "prompt=a cat", "retriever=oracle", f"out_dir={tmp_path}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: retriever: unknown retriever config 'oracle'"), lines
    assert "chat, lexicon, none, toy_lexicon, zero_shot" in lines[0]
