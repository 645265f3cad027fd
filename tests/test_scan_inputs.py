"""Scan inputs that used to be accepted silently or end in a traceback: a missing texts file, no
tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _scan_models import ByteTokenizer, tiny_llama  # noqa: E402

import hwnoise as hn  # noqa: E402
from hwnoise.scan import calibration_texts  # noqa: E402


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("HWNOISE_COMPILE", "0")


@pytest.mark.parametrize("texts", ["missing.txt", "data/calibration.jsonl", "my notes.txt", "~/nowhere.json"])
def test_scan_texts_missing_file_is_an_error_not_the_calibration_text(texts):
    with pytest.raises(ValueError, match=r"does not exist.*pass a list"):
        calibration_texts(texts)
    with pytest.raises(ValueError, match="does not exist"):
        hn.scan(tiny_llama(layers=1), ByteTokenizer(), texts=texts, end_to_end=False)


def test_scan_texts_string_rule(tmp_path):
    sentence = "The lighthouse keeper climbed the stairs at dusk."
    assert calibration_texts(sentence) == [sentence]  # whitespace, no file suffix: one text
    assert calibration_texts(["hello"]) == ["hello"]  # a one-word text goes in a list
    with pytest.raises(ValueError, match=r"texts=\['hello'\]"):
        calibration_texts("hello")
    path = tmp_path / "calib.txt"
    path.write_text("first text here\nsecond text here\n")
    assert calibration_texts(str(path)) == ["first text here", "second text here"]
    assert calibration_texts(path) == ["first text here", "second text here"]


def test_scan_tokenizer_none_is_a_clear_error():
    with pytest.raises(ValueError, match=r"needs the model's tokenizer.*got None.*hwnoise\.models\.load"):
        hn.scan(tiny_llama(layers=1), None)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        hn.scan_faults(tiny_llama(layers=1), None)
