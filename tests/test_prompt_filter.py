"""The prompt safety filter (``prompt_filter``): decisions against softmax(logits) of the classifier computed here,
the threshold's ends, one-line config errors, and evaluate / generate runs on the tiny backbone with the filter.

The classifier is a tiny random ``BertForSequenceClassification`` (labels SFW / NSFW, like
michellejieli/inappropriate_text_classifier) with a word-level tokenizer, both saved to a temp folder; nothing is
downloaded.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from alignment.cli import CONF_DIR
from alignment.errors import ConfigError
from alignment.evaluation.prompt_filter import PromptSafetyFilter
from tests.conftest import run_cli

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "red", "blue", "green", "circle", "square",
         "triangle", "cat", "dog", "owl", "on", "white", "black", "background", "sitting", "running", "big", "small"]
PROMPTS = ["a red circle on a white background", "a blue square on a black background", "a small owl sitting",
           "the big dog running", "a green triangle", "an owl on a red square", "a cat", "the small blue circle"]


def save_classifier(folder, id2label=None, weights: bool = True):
    """A 2-layer BERT classifier (hidden 32, 2 heads) with random weights and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    id2label = id2label or {0: "SFW", 1: "NSFW"}
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.5,
                        id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model = BertForSequenceClassification(config).eval()
    if weights:
        model.save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    vocab = {word: i for i, word in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]", model_max_length=64).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return save_classifier(tmp_path_factory.mktemp("tiny_nsfw"))


def by_hand(folder, prompts) -> list[float]:
    """P(NSFW) of each prompt: the model read back directly, one prompt at a time (no padding), softmax."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            logits = model(**tokenizer(prompt, return_tensors="pt")).logits[0].double()
            out.append((logits.exp() / logits.exp().sum())[1].item())
    return out


def middle_threshold(probs: list[float]) -> float:
    """A threshold between the 4th and 5th smallest of eight probabilities: four prompts kept, four dropped."""
    ordered = sorted(probs)
    assert ordered[4] - ordered[3] > 1e-3, ordered  # the random classifier separates them
    return (ordered[3] + ordered[4]) / 2


def compose(config: str, *overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config, overrides=list(overrides))


# ------------------------------------------------------------------------------------------------ the filter
def test_decisions_equal_softmax_of_the_logits(classifier):
    expected = by_hand(classifier, PROMPTS)
    threshold = middle_threshold(expected)
    flt = PromptSafetyFilter(str(classifier), unsafe_labels=["NSFW"], threshold=threshold, batch_size=3,
                             device="cpu")
    assert flt.labels == ["SFW", "NSFW"] and flt.model is None  # weights load on first use
    probs = flt.probabilities(PROMPTS)  # batches of 3, padded: the same numbers as one prompt at a time
    assert probs.shape == (8, 2) and torch.allclose(probs.sum(1), torch.ones(8))
    assert flt.unsafe_probabilities(PROMPTS) == pytest.approx(expected, abs=1e-5)
    keep = flt(PROMPTS)
    assert keep == [p < threshold for p in expected] and sum(keep) == 4

    # both labels unsafe: p = 1 for every prompt, all dropped at threshold 0.99
    both = PromptSafetyFilter(str(classifier), unsafe_labels=["NSFW", "SFW"], threshold=0.99, device="cpu")
    assert both(PROMPTS) == [False] * 8
    # a label id works too (unsafe_labels=[1] for a model with LABEL_0 / LABEL_1)
    by_id = PromptSafetyFilter(str(classifier), unsafe_labels=[1], threshold=threshold, device="cpu")
    assert by_id.unsafe_labels == ["NSFW"] and by_id(PROMPTS) == keep

    result = flt.select(PROMPTS)
    assert result.kept == [i for i, k in enumerate(keep) if k] and result.examined == 8
    assert [d["index"] for d in result.dropped] == [i for i, k in enumerate(keep) if not k]
    assert all(d["prompt"] == PROMPTS[d["index"]] and d["p_unsafe"] >= threshold for d in result.dropped)
    # with a limit, classification stops once that many prompts are kept
    first = result.kept[1]
    limited = flt.select(PROMPTS, limit=2)
    assert limited.kept == result.kept[:2] and limited.examined == first + 1
    assert [d["index"] for d in limited.dropped] == [d["index"] for d in result.dropped if d["index"] < first]


def test_threshold_ends(classifier):
    drop_all = PromptSafetyFilter(str(classifier), threshold=0.0, device="cpu")
    assert drop_all(PROMPTS) == [False] * len(PROMPTS)
    assert PromptSafetyFilter(str(classifier), threshold=1.01, device="cpu")(PROMPTS) == [True] * len(PROMPTS)
    with pytest.raises(ConfigError) as err:
        drop_all.filter_records([{"prompt": p} for p in PROMPTS])
    message = str(err.value)
    assert message.startswith("prompt_filter.threshold: all 8 prompt(s) were dropped") and "\n" not in message


def test_config_errors_are_one_line(classifier, tmp_path):
    def error(**node) -> str:
        with pytest.raises(ConfigError) as err:
            PromptSafetyFilter.from_config({"model": str(classifier), **node})
        assert "\n" not in str(err.value), str(err.value)
        return str(err.value)

    message = error(unsafe_labels=["nsfw", "NSFW"])
    assert message.startswith("prompt_filter.unsafe_labels: 'nsfw' is not a label of") and "SFW, NSFW" in message
    assert error(unsafe_labels=[]).startswith("prompt_filter.unsafe_labels must be a non-empty list")
    assert error(threshold="high").startswith("prompt_filter.threshold must be a number")
    assert error(batch_size=0).startswith("prompt_filter.batch_size must be a positive integer")
    assert error(device="tpu").startswith("prompt_filter.device: unknown device")
    assert error(treshold=0.5).startswith("prompt_filter.treshold: unknown key")

    # the label check reads the model's config only: it fails the same without any weight file
    config_only = save_classifier(tmp_path / "config_only", weights=False)
    assert not list(config_only.glob("*.safetensors"))
    with pytest.raises(ConfigError, match=r"^prompt_filter\.unsafe_labels: 'unsafe' is not a label .*SFW, NSFW"):
        PromptSafetyFilter.from_config({"model": str(config_only), "unsafe_labels": ["unsafe"]})
    # ... and a filter with right labels but no weights fails, one line, when the weights are read
    flt = PromptSafetyFilter.from_config({"model": str(config_only)})
    with pytest.raises(ConfigError) as err:
        flt(["a cat"])
    assert str(err.value).startswith("prompt_filter.model: cannot load") and "\n" not in str(err.value)

    missing = tmp_path / "no_such_model"
    with pytest.raises(ConfigError) as err:
        PromptSafetyFilter.from_config({"model": str(missing)})
    message = str(err.value)
    assert message.startswith(f"prompt_filter.model: '{missing}' is not a local folder") and "\n" not in message
    assert "HF_HUB_OFFLINE" in message
    with pytest.raises(ConfigError, match=r"^prompt_filter\.model: 'someone/not-cached-classifier' is not a local"):
        PromptSafetyFilter.from_config({"model": "someone/not-cached-classifier"})

    assert PromptSafetyFilter.from_config(None) is None
    assert PromptSafetyFilter.from_config({"model": None, "unsafe_labels": ["anything"]}) is None  # off


def test_filter_is_off_by_default(tmp_path):
    from alignment.evaluation.plan import build_plan

    cfg = compose("evaluate", f"output_dir={tmp_path}")
    assert cfg.prompt_filter.model is None and list(cfg.prompt_filter.unsafe_labels) == ["NSFW"]
    plan = build_plan(cfg)
    assert plan.prompt_filter is None and len(plan.prompts) == 2
    assert compose("generate", "prompt=x").prompt_filter.model is None


def test_plan_keeps_the_first_max_prompts_that_pass(classifier, tmp_path):
    from alignment.evaluation.plan import build_plan

    threshold = middle_threshold(by_hand(classifier, PROMPTS))
    keep = PromptSafetyFilter(str(classifier), threshold=threshold, device="cpu")(PROMPTS)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p, "value": i}) + "\n" for i, p in enumerate(PROMPTS)))
    common = (f"output_dir={tmp_path / 'out'}", f"prompts={prompts_file}", f"prompt_filter.model={classifier}",
              f"prompt_filter.threshold={threshold}", "images_per_prompt=2", "seed=7")
    plan = build_plan(compose("evaluate", *common))
    kept = [i for i, k in enumerate(keep) if k]
    assert plan.prompts == [PROMPTS[i] for i in kept] and plan.extras["value"] == kept  # rows keep their extras
    assert plan.prompt_filter["kept_indices"] == kept and plan.prompt_filter["kept"] == 4
    assert plan.prompt_filter["dropped"] == 4 and plan.prompt_filter["examined"] == 8
    assert plan.jobs()[:3] == [(0, PROMPTS[kept[0]], 7), (0, PROMPTS[kept[0]], 8), (1, PROMPTS[kept[1]], 7)]

    limited = build_plan(compose("evaluate", *common, "max_prompts=2"))
    assert limited.prompts == [PROMPTS[i] for i in kept[:2]] and limited.prompt_filter["examined"] == kept[1] + 1
    with pytest.raises(ConfigError, match=r"^prompt_filter\.unsafe_labels: 'toxic' is not a label"):
        build_plan(compose("evaluate", *common, "prompt_filter.unsafe_labels=[toxic]"))


def test_generate_writes_only_kept_prompts(classifier, tmp_path):
    from alignment.generate import generate

    threshold = middle_threshold(by_hand(classifier, PROMPTS))
    keep = PromptSafetyFilter(str(classifier), threshold=threshold, device="cpu")(PROMPTS)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "images"
    common = (f"prompts={prompts_file}", f"out_dir={out}", "num_inference_steps=1", "device=cpu", "seeds=[3]")
    result = generate(compose("generate", *common, f"prompt_filter.model={classifier}",
                              f"prompt_filter.threshold={threshold}"))
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert result["images"] == 4 and [r["prompt"] for r in rows] == [p for p, k in zip(PROMPTS, keep) if k]
    assert [r["prompt_index"] for r in rows] == [0, 1, 2, 3]  # renumbered
    summary = json.loads((out / "prompt_filter.json").read_text())
    assert summary["kept_indices"] == [i for i, k in enumerate(keep) if k] and summary["dropped"] == 4
    # the same folder without the filter: the record of the filtered run goes
    generate(compose("generate", *common))
    assert not (out / "prompt_filter.json").exists()


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_evaluate_cli_records_kept_and_dropped(classifier, tmp_path):
    threshold = middle_threshold(by_hand(classifier, PROMPTS))
    keep = PromptSafetyFilter(str(classifier), threshold=threshold, device="cpu")(PROMPTS)
    kept = [i for i, k in enumerate(keep) if k]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    run_dir = tmp_path / "run"
    proc = run_cli("alignment.evaluate", f"hydra.run.dir={run_dir}", f"prompts={prompts_file}",
                   "images_per_prompt=2", "num_inference_steps=1", "metrics.winrate.num_bootstrap=0",
                   f"prompt_filter.model={classifier}", f"prompt_filter.threshold={threshold}",
                   "prompt_filter.device=cpu", "device=cpu", timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "prompt filter: kept 4 of 8 prompt(s) (4 dropped" in proc.stdout
    assert "images base: 8 generated, 0 reused" in proc.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    record = metrics["prompt_filter"]
    assert record["model"] == str(classifier) and record["kept"] == 4 and record["dropped"] == 4
    assert record["kept_indices"] == kept and record["renumbered"] is True
    assert [d["prompt"] for d in record["dropped_prompts"]] == [p for p, k in zip(PROMPTS, keep) if not k]
    assert metrics["config"]["num_prompts"] == 4
    assert metrics["config"]["prompt_filter"] == {"model": str(classifier), "unsafe_labels": ["NSFW"],
                                                  "threshold": threshold}
    images = sorted(p.name for p in (run_dir / "images" / "base").glob("*.png"))
    assert images == [f"{i:05d}_seed{s}.png" for i in range(4) for s in (0, 1)]
    manifest = json.loads((run_dir / "images" / "base" / "manifest.json").read_text())
    assert [manifest["images"][f"{i:05d}_seed0.png"]["prompt"] for i in range(4)] == [PROMPTS[i] for i in kept]
    report = (run_dir / "report.html").read_text()
    assert "prompt filter" in report and "4 prompt(s) dropped by the safety filter" in report
    assert report.count("<img") == 8

    # a misspelt label on the command line: one line, exit 2, before the backbone is built
    proc = run_cli("alignment.evaluate", f"hydra.run.dir={tmp_path / 'bad'}", f"prompt_filter.model={classifier}",
                   "prompt_filter.unsafe_labels=[nsfw]", timeout=240)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: prompt_filter.unsafe_labels: 'nsfw' is not a label")
