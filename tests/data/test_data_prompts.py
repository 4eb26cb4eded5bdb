"""Tests of alignment.data.prompts.read_prompts for every supported format."""

import json
from pathlib import Path

import pytest

from alignment.data.prompts import read_prompts
from alignment.errors import DataError

PARTI_PROMPTS = Path("/work/shared/data/PartiPrompts.tsv")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_skips_blank_lines(tmp_path):
    path = _write(tmp_path / "p.txt", "a cat\n\n  a dog  \n\t\nan owl")
    assert read_prompts(path) == ["a cat", "a dog", "an owl"]


def test_jsonl_prompt_and_caption_keys(tmp_path):
    lines = [json.dumps({"prompt": "a cat", "id": 1}), "", json.dumps({"caption": "a dog"}), json.dumps("an owl")]
    assert read_prompts(_write(tmp_path / "p.jsonl", "\n".join(lines) + "\n")) == ["a cat", "a dog", "an owl"]


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = _write(tmp_path / "p.jsonl", json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataError, match=f"{path} line 2: object has no string 'prompt'"):
        read_prompts(path)
    path = _write(tmp_path / "q.jsonl", "{not json\n")
    with pytest.raises(DataError, match=f"{path} line 1: not valid JSON"):
        read_prompts(path)


def test_json_list_of_strings_and_objects(tmp_path):
    assert read_prompts(_write(tmp_path / "a.json", json.dumps(["a cat", "a dog"]))) == ["a cat", "a dog"]
    objects = [{"prompt": "a cat", "category": "Animals"}, {"prompt": "a dog"}]
    assert read_prompts(_write(tmp_path / "b.json", json.dumps(objects))) == ["a cat", "a dog"]
    path = _write(tmp_path / "c.json", json.dumps({"prompt": "a cat"}))
    with pytest.raises(DataError, match=f"{path}: expected a JSON list"):
        read_prompts(path)


def test_tsv_parti_prompts_format(tmp_path):
    text = (
        "Prompt\tCategory\tChallenge\tNote\n"
        "bond\tAbstract\tBasic\tBiology-inspired\n"
        '"G I G G L E" painted on a wall\tWorld Knowledge\tWriting & Symbols\t\n'
        "\tEmpty\tBasic\t\n"
    )
    prompts = read_prompts(_write(tmp_path / "parti.tsv", text))
    assert prompts == ["bond", '"G I G G L E" painted on a wall']


def test_csv_lowercase_column(tmp_path):
    text = 'id,prompt\n1,a cat\n2,"a dog, sitting"\n'
    assert read_prompts(_write(tmp_path / "p.csv", text)) == ["a cat", "a dog, sitting"]


def test_missing_column(tmp_path):
    path = _write(tmp_path / "p.tsv", "Text\tCategory\na cat\tAnimals\n")
    with pytest.raises(DataError, match=f"{path}: no 'Prompt' or 'prompt' column"):
        read_prompts(path)


def test_missing_file(tmp_path):
    path = tmp_path / "missing.txt"
    with pytest.raises(DataError, match=f"prompt file {path} does not exist"):
        read_prompts(path)


def test_unknown_extension(tmp_path):
    path = _write(tmp_path / "prompts.yaml", "- a cat\n")
    with pytest.raises(DataError, match=f"prompt file {path}: unsupported suffix '.yaml'"):
        read_prompts(path)


def test_empty_file(tmp_path):
    path = _write(tmp_path / "empty.txt", "\n\n")
    with pytest.raises(DataError, match=f"prompt file {path} holds no prompts"):
        read_prompts(path)


@pytest.mark.skipif(not PARTI_PROMPTS.is_file(), reason="PartiPrompts.tsv is not available")
def test_real_parti_prompts():
    prompts = read_prompts(PARTI_PROMPTS)
    assert len(prompts) > 1600
    assert prompts[0] == "bond"
    assert all(prompt == prompt.strip() and prompt for prompt in prompts)
    assert any(prompt.startswith('"') for prompt in prompts)  # TSV fields are not unquoted


def test_pickapic_parquet_gives_unique_captions_in_order(tmp_path):
    from alignment.data.synthetic import make_synthetic_pairs
    import pyarrow.parquet as pq

    path = make_synthetic_pairs(tmp_path / "pairs.parquet", num_rows=24)
    captions = pq.read_table(path).column("caption").to_pylist()
    prompts = read_prompts(path)
    assert prompts == list(dict.fromkeys(captions)) and len(prompts) < len(captions)


def test_parquet_without_caption_column_names_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), path)
    with pytest.raises(DataError, match=f"{path}: no 'caption' or 'prompt' column"):
        read_prompts(path)
