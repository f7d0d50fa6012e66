"""The cheap look at a data file while the scenario is validated (`fedsim.config.sources`): its
size, its first line or header row, its magic bytes; each problem names the file and where."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsim.config.scenario import ScenarioError, load_scenario
from fedsim.config.sources import data_file_problems, resolve_fields

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "scenarios" / "tiny.toml"

GOOD = {
    "d.jsonl": '\n{"prompt": "p", "response": "r"}\n',
    "d.json": '[{"instruction": "i", "output": "o"}]',
    "d.csv": "instruction,input,output\ni,x,o\n",
    "bom.csv": b"\xef\xbb\xbfprompt,response\np,r\n",  # a byte-order mark is not part of the first name
    "d.parquet": b"PAR1" + b"\0" * 8 + b"PAR1",  # the magic bytes are all this check reads
}

BAD = [
    ("empty", "d.jsonl", "", "{path}: the file is empty"),
    ("jsonl not JSON", "d.jsonl", "\n\nprompt: p\n", "{path} line 3: not JSON (Expecting value, column 1)"),
    ("jsonl not an object", "d.jsonl", '["p", "r"]\n', "{path} line 1: expected a JSON object per line, got list"),
    ("jsonl blank", "d.jsonl", "\n  \n", "{path}: no rows (only blank lines)"),
    ("json not JSON", "d.json", "prompt,response\n", "{path}: not JSON (starts with 'prompt,response"),
    (
        "csv without the fields",
        "d.csv",
        "question,answer\nq,a\n",
        "{path} line 1 (header): no prompt field (looked for 'prompt' or 'instruction'; set `data.prompt_field`); "
        "no response field (looked for 'response' or 'output'; set `data.response_field`); "
        "columns found: question, answer",
    ),
    ("csv header only", "d.csv", "prompt,response\n", "{path}: a header and no rows"),
    ("csv ragged", "d.csv", "prompt,response\n\na,b,c\n", "{path} line 3: 3 fields, but the header (line 1) has 2"),
    ("csv empty header", "d.csv", "\nprompt,response\n", "{path} line 1: empty header row"),
    ("csv not UTF-8", "d.csv", b"prompt,response\n\xff\xfe,x\n", "{path}: not UTF-8 text"),
    ("parquet garbled", "d.parquet", b"not parquet at all", "{path}: not a Parquet file"),
]


@pytest.mark.parametrize(("name", "content"), GOOD.items(), ids=list(GOOD))
def test_a_file_that_starts_right_passes(tmp_path: Path, name: str, content: str | bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert data_file_problems(str(path)) == []


@pytest.mark.parametrize(("case", "name", "content", "expected"), BAD, ids=[b[0] for b in BAD])
def test_a_file_that_starts_wrong_is_named_with_its_problem(
    tmp_path: Path, case: str, name: str, content: str | bytes, expected: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    problems = data_file_problems(str(path))
    assert len(problems) == 1
    assert problems[0].startswith(expected.format(path=path))


def test_sources_that_are_not_files_are_left_to_other_checks(tmp_path: Path) -> None:
    for task in ("sentiment", "hf:org/set", str(tmp_path / "absent.jsonl"), str(tmp_path / "notes.txt")):
        assert data_file_problems(task) == []


def test_csv_header_is_checked_against_the_named_fields(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("q,a\nx,y\n")
    assert data_file_problems(str(path), prompt_field="q", response_field="a") == []
    (problem,) = data_file_problems(str(path), prompt_field="q", response_field="a", domain_field="topic")
    assert "`data.domain_field`='topic' is not a column; columns found: q, a" in problem


def test_resolve_fields_defaults_and_instruction_input() -> None:
    fields, problems = resolve_fields(["instruction", "input", "output", "domain"], None, None, None)
    assert problems == []
    assert fields == ("instruction", "input", "output", "domain")
    _, problems = resolve_fields(["foo"], None, None, None)
    assert [p.split(" (")[0] for p in problems] == ["no prompt field", "no response field"]


def test_a_bad_data_file_is_reported_with_every_other_scenario_problem(tmp_path: Path) -> None:
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    with pytest.raises(ScenarioError) as info:
        load_scenario(TINY, [f"data.task='{data}'", "train.lr=-1"])
    assert info.value.problems == [
        f"`data.task`: {data}: the file is empty",
        "`train.lr` must be greater than 0, got -1",
    ]
