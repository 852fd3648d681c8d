"""A data file that is not UTF-8: one error naming the file, the line and the byte, and how to re-save it."""

from __future__ import annotations

import pytest

from lora_rlhf.core.data import load_table
from lora_rlhf.core.io import read_jsonl
from lora_rlhf.errors import DataError
from lora_rlhf.recipe.config import DatasetConfig

LATIN1 = b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'  # "cafe" with an accent, saved as Latin-1


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_data_file_that_is_not_utf8_is_one_clear_error(tmp_path, suffix):
    """Every loader (data.sft/prompts/ptx/eval/reward through load_table, score's pairs through read_jsonl) names
    the file, the line and the byte, and says how to re-save it, instead of a raw UnicodeDecodeError."""
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(LATIN1 if suffix != ".csv" else b"prompt\nok\ncaf\xe9\n")
    line, byte = (2, LATIN1.split(b"\n")[1].index(b"\xe9") + 1) if suffix != ".csv" else (3, 4)
    expected = rf"latin1{suffix}' is not UTF-8 text: line {line}, byte {byte} of that line is 0xe9"
    with pytest.raises(DataError, match=expected) as e:
        load_table(DatasetConfig(path=str(path)), what="prompts dataset")
    assert "prompts dataset file" in e.value.what and "UTF-8" in e.value.fix
    if suffix == ".jsonl":
        with pytest.raises(DataError, match=expected):
            read_jsonl(path, "pairs file")
    path.write_bytes(LATIN1.replace(b"\xe9", "\u00e9".encode()))  # the same text in UTF-8 loads
    if suffix != ".csv":
        assert read_jsonl(path)[1] == (2, {"prompt": "caf\u00e9"})
