"""hwnoise.evaluate on a tiny Llama and a character tokenizer built in the test: left padding,
EOS, determinism with noise, exact resume after a kill, the run header, bad input, the report."""

from __future__ import annotations

import json
import string

import pytest
import torch

from hwnoise.eval import (
    EVAL_RUN_FILE,
    RECORDS_FILE,
    EvalReport,
    build_prompts,
    core,
    evaluate,
    generate_greedy,
    read_records,
)

QUESTIONS = ["What is 2 + 3?", "Mia has 4 apples and buys 5 more. How many now?", "7 * 6 = ?",
             "A long question about 12 boxes of 9 pencils each, and then some are given away: how many?",
             "1 + 1?", "Tom had $30 and spent $12. How much is left?", "Count: 3, 4, 5, ...", "9 - 4"]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}A:{% endif %}")


def char_tokenizer(chat: bool = True):
    """One token per printable character; <pad>=0, <s>=1, </s>=2 (EOS)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in string.printable:
        if ch not in "\x0b\x0c\r":
            vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>")
    if chat:
        t.chat_template = CHAT_TEMPLATE
    return t


def tiny_model(vocab: int = 101, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 2
    return model.eval()


def problems(n: int = 8):
    return [{"id": f"p{i}", "question": QUESTIONS[i % len(QUESTIONS)] + " " * (i // len(QUESTIONS)),
             "gold": str(i)} for i in range(n)]


class Counting:
    """Counts model.generate calls (each is one batch)."""

    def __init__(self, model):
        self.calls = 0
        self._generate = model.generate

        def generate(*args, **kwargs):
            self.calls += 1
            return self._generate(*args, **kwargs)

        model.generate = generate


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


# -- generation ------------------------------------------------------------------------------

def test_prompts_use_the_chat_template_or_plain_text(tok):
    from hwnoise.data import prompt_text

    chat = build_prompts(tok, ["2 + 2?"])[0]
    assert chat.text.startswith("<s>") and chat.text.endswith("A:") and "2 + 2?" in chat.text
    assert chat.ids[0] == 1 and chat.ids.count(1) == 1  # the template's BOS, not a second one
    plain = build_prompts(char_tokenizer(chat=False), ["2 + 2?"])[0]
    assert plain.text == prompt_text("2 + 2?")


def test_batched_left_padded_equals_one_at_a_time(model, tok):
    prompts = build_prompts(tok, QUESTIONS)
    assert len({len(p.ids) for p in prompts}) > 3  # really different lengths: real padding
    batched = generate_greedy(model, tok, prompts, 12)
    single = [generate_greedy(model, tok, [p], 12)[0] for p in prompts]
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.generated_tokens for c in batched] == [c.generated_tokens for c in single] == [12] * len(prompts)
    assert tok.padding_side == "right"  # the tokenizer was not changed


def test_generation_stops_at_eos(model, tok):
    """Row 0 is forced to say EOS at its third token: it stops there (EOS counted, not decoded); the
    other rows run to the limit."""
    steps = []

    def force_eos(module, args, logits):
        steps.append(None)
        if len(steps) == 3:
            logits[0, -1, 2] = 1e4

    handle = model.lm_head.register_forward_hook(force_eos)
    try:
        out = generate_greedy(model, tok, build_prompts(tok, QUESTIONS[:3]), 10)
    finally:
        handle.remove()
    free = generate_greedy(model, tok, build_prompts(tok, QUESTIONS[:3]), 10)
    assert [c.generated_tokens for c in out] == [3, 10, 10]
    assert out[0].text == free[0].text[: len(out[0].text)] and len(out[0].text) == 2
    assert [c.text for c in out[1:]] == [c.text for c in free[1:]]


# -- evaluate: determinism, resume, header -----------------------------------------------------

SETTINGS = ["relative:0.2@ops", "absolute:0.05@output"]


def _lines(out):
    return sorted((out / RECORDS_FILE).read_text().splitlines())


def _results(out):
    data = json.loads((out / "eval.json").read_text())
    data.pop("seconds")
    return data


def test_same_seed_same_completions_noise_included(model, tok, tmp_path):
    a = evaluate(model, tok, problems(6), SETTINGS, batch_size=4, max_new_tokens=6, seed=3, out=tmp_path / "a")
    b = evaluate(model, tok, problems(6), SETTINGS, batch_size=4, max_new_tokens=6, seed=3, out=tmp_path / "b")
    assert _lines(tmp_path / "a") == _lines(tmp_path / "b")
    records = read_records(tmp_path / "a" / RECORDS_FILE)
    assert len(records) == 6 * 3
    by_setting = {s: [records[(s, f"p{i}")]["completion"] for i in range(6)] for s in ["clean", *SETTINGS]}
    assert by_setting["relative:0.2@ops"] != by_setting["clean"]  # the noise is really on
    evaluate(model, tok, problems(6), SETTINGS, batch_size=4, max_new_tokens=6, seed=4, out=tmp_path / "c")
    other = read_records(tmp_path / "c" / RECORDS_FILE)
    assert [other[("clean", f"p{i}")]["completion"] for i in range(6)] == by_setting["clean"]
    assert [other[("relative:0.2@ops", f"p{i}")]["completion"] for i in range(6)] != by_setting["relative:0.2@ops"]
    assert a.to_json()["settings"] == b.to_json()["settings"]


def test_evaluate_restores_the_model(tok):
    model = tiny_model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, tok, problems(3), ["relative:0.2@ops", "weights:nvfp4", "aqn:0.05"], batch_size=2, max_new_tokens=3)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class Killed(Exception):
    pass


def test_resume_after_a_kill_is_exact_and_skips_finished_batches(model, tok, tmp_path):
    kwargs = {"batch_size": 3, "max_new_tokens": 5, "seed": 1}
    full = tmp_path / "full"
    counter = Counting(model)
    evaluate(model, tok, problems(8), SETTINGS, out=full, **kwargs).save(full)
    batches = 3  # ceil(8 / 3) per setting
    assert counter.calls == 3 * batches

    part = tmp_path / "part"
    finished = []

    def kill_after_four(label, done, total):
        finished.append((label, done))
        if len(finished) == 1 + 3 + 1 + 1:  # clean: start + 3 batches; relative: start + 1 batch
            raise Killed

    with pytest.raises(Killed):
        evaluate(model, tok, problems(8), SETTINGS, out=part, on_progress=kill_after_four, **kwargs)
    assert len(read_records(part / RECORDS_FILE)) == 8 + 3
    counter.calls = 0
    evaluate(model, tok, problems(8), SETTINGS, out=part, **kwargs).save(part)
    assert counter.calls == 2 * batches - 1  # relative: 2 left, absolute: all 3
    assert _lines(part) == _lines(full)
    assert _results(part) == _results(full)

    # a kill in the middle of a line: that batch is recomputed, only the missing records appended
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / EVAL_RUN_FILE).write_bytes((full / EVAL_RUN_FILE).read_bytes())
    data = (full / RECORDS_FILE).read_bytes()
    lines = data.splitlines(keepends=True)
    keep = b"".join(lines[:13]) + lines[13][: len(lines[13]) // 2]  # clean, 4 of relative's 8, and half a line
    (torn / RECORDS_FILE).write_bytes(keep)
    counter.calls = 0
    evaluate(model, tok, problems(8), SETTINGS, out=torn, **kwargs).save(torn)
    assert counter.calls == 2 + 3  # relative: the batch holding records 4-5 and the last; absolute: all
    assert _lines(torn) == _lines(full)
    assert len(_lines(torn)) == 24  # nothing twice, the torn half-line gone
    assert _results(torn) == _results(full)


def test_a_different_run_is_refused_and_overwrite_starts_afresh(model, tok, tmp_path):
    evaluate(model, tok, problems(4), SETTINGS[:1], batch_size=2, max_new_tokens=3, seed=0, out=tmp_path)
    with pytest.raises(ValueError, match=r"seed: 0 there, 1 now.*--overwrite"):
        evaluate(model, tok, problems(4), SETTINGS[:1], batch_size=2, max_new_tokens=3, seed=1, out=tmp_path)
    with pytest.raises(ValueError, match=r"settings.*max_new_tokens|max_new_tokens.*settings"):
        evaluate(model, tok, problems(4), SETTINGS, batch_size=2, max_new_tokens=4, seed=0, out=tmp_path)
    with pytest.raises(ValueError, match="problems_sha256"):
        evaluate(model, tok, problems(4)[::-1], SETTINGS[:1], batch_size=2, max_new_tokens=3, seed=0, out=tmp_path)
    evaluate(model, tok, problems(4), SETTINGS[:1], batch_size=2, max_new_tokens=3, seed=1, out=tmp_path, overwrite=True)
    assert json.loads((tmp_path / EVAL_RUN_FILE).read_text())["seed"] == 1
    assert len(read_records(tmp_path / RECORDS_FILE)) == 8


def test_records_without_a_header_are_refused(model, tok, tmp_path):
    (tmp_path / RECORDS_FILE).write_text('{"setting": "clean", "problem_id": "p0"}\n')
    with pytest.raises(ValueError, match="without a run.json"):
        evaluate(model, tok, problems(2), [], max_new_tokens=2, out=tmp_path)


# -- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"problems": [{"id": "a", "question": "q?"}]}, r"lacks field\(s\) \['gold'\]"),
    ({"problems": [{"question": "q?", "gold": "1"}]}, r"lacks field\(s\) \['id'\]"),
    ({"n": 9}, "n=9 is larger than the data: only 8"),
    ({"n": 0}, "n must be a positive integer"),
    ({"settings": ["relatve:0.05@ops"]}, "unknown part 'relatve:0.05@ops'"),
    ({"settings": ["relative:0.05@gpu"]}, "unknown where 'gpu'"),
    ({"settings": ["weights:mxfp5"]}, "mxfp5"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"metric": "exact"}, "unknown metric 'exact'; known: strict, flexible"),
    ({"problems": problems(2) + problems(1)}, "duplicate problem id 'p0'"),
    ({"problems": []}, "no problems"),
])
def test_bad_input_is_refused_before_generating(tok, kwargs, message):
    model = tiny_model()
    counter = Counting(model)
    args = {"problems": problems(8), "settings": ["relative:0.05@ops"], "n": None, "batch_size": 4, "max_new_tokens": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        evaluate(model, tok, **args)
    assert counter.calls == 0


# -- the report -------------------------------------------------------------------------------

def test_report_json_table_and_files(model, tok, tmp_path):
    from hwnoise.data import Problem
    from hwnoise.emulation import Emulation

    probs = [Problem(id=p["id"], question=p["question"], answer=f"#### {p['gold']}", gold=p["gold"]) for p in problems(5)]
    report = evaluate(model, tok, probs, [Emulation.parse("relative:0.1@ops"), "relative:0.1@ops", "clean"],
                      batch_size=2, max_new_tokens=4, metric="flexible", data_name="tiny")
    data = report.to_json()
    assert [s["spec"] for s in data["settings"]] == ["clean", "relative:0.1@ops"]  # clean first, no duplicates
    assert data["metric"] == "flexible" and data["n"] == 5 and data["data"] == "tiny"
    s = data["settings"][1]
    assert set(s["accuracy"]) == set(s["wilson_ci"]) == {"strict", "flexible"}
    assert s["scale"] == 0.1 and s["mean_generated_tokens"] == 4.0
    (c,) = data["comparisons"]
    assert c["metric"] == "flexible" and c["setting"] == "relative:0.1@ops"
    for key in ("drop", "drop_ci", "mcnemar_p", "b", "c", "robustness", "n_needed", "reason", "difference"):
        assert key in c
    assert set(c["by_metric"]) == {"strict", "flexible"}
    assert c["drop"] == pytest.approx(data["settings"][0]["accuracy"]["flexible"] - s["accuracy"]["flexible"])
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(report.to_table())
    assert "relative 0.1 @ops" in console.export_text()
    report.save(tmp_path)
    assert json.loads((tmp_path / "eval.json").read_text())["comparisons"][0]["setting"] == "relative:0.1@ops"
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert EvalReport.load_json(tmp_path)["n"] == 5


def test_png_handles_formats_and_noise_families(model, tok, tmp_path):
    from hwnoise.eval.views import render_png

    report = evaluate(model, tok, problems(2), ["relative:0.1@ops", "relative:0.3@ops", "weights:nvfp4", "aqn:0.01"],
                      batch_size=2, max_new_tokens=2)
    assert render_png(report.to_json())[:4] == b"\x89PNG"
    only_clean = evaluate(model, tok, problems(2), [], batch_size=2, max_new_tokens=2)
    assert render_png(only_clean.to_json())[:4] == b"\x89PNG"
    assert core.parse_settings(None)[0].is_clean
