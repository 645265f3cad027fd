"""Cost of hwnoise's TRL integration: seconds per GRPO step, plain TRL vs `hwnoise train` with AQN on.

Both trainers get the same GRPOConfig, data and reward: the bundled SmolLM2-135M, 4 completions of
exactly 48 tokens per step (min_new_tokens = max_completion_length, so sampling cannot change the
work), full fine-tuning on CPU, gradient checkpointing on (TRL's default).

- plain TRL : `trl.GRPOTrainer`;
- hwnoise   : `hwnoise.rl.build_trainer` with AQN on (constant sigma 1e-2 on the 61 RMSNorm
              weights, so noise is drawn and restored at every step);
- +MXFP4    : (with --format) the same plus MXFP4 W4A16 rollouts (210 linear weights quantized at
              every rollout): a different feature, shown for its cost, not part of the target.

Settings run interleaved: each round trains every setting for 1 warm-up step + --steps timed steps
(the time from on_step_begin to on_step_end), so load from other processes hits all of them alike.
The table gives the median seconds per step and the ratio to plain TRL; the target is hwnoise <= 1.05x.
The AQN apply + restore cost is also timed on its own (it is the only work hwnoise adds to a step
with AQN alone), which bounds the overhead independently of the step-time noise.

Run: python benchmarks/train.py [--steps 3] [--rounds 2] [--threads N] [--format] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

MAX_TOKENS = 48
COMPLETIONS = 4


def _config(run_dir: str, aqn: bool, weight_format: str | None, steps: int):
    from hwnoise.rl import TrainConfig

    return TrainConfig.from_dict({
        "run_dir": run_dir, "steps": steps, "seed": 0, "device": "cpu",
        "data": {"train": "arith", "n_train": 64, "n_eval": 1},
        "algorithm": {"num_generations": COMPLETIONS, "batch_size": COMPLETIONS,
                      "max_completion_length": MAX_TOKENS, "learning_rate": 1e-6},
        "aqn": {"enabled": aqn, "schedule": "constant", "sigma_start": 1e-2},
        "emulation": {"rollout": f"weights:{weight_format}" if weight_format else None},
        "eval": {"max_new_tokens": 1, "batch_size": 1},
        "logging": {"report_to": ["none"], "save_steps": 0},
    }).validate()


class StepTimer:
    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.seconds.append(time.perf_counter() - timer.t0)

        self.seconds: list[float] = []
        self.callback = Callback()


def _trainer(setting: str, steps: int, timer: StepTimer, tmp: str):
    from trl import GRPOTrainer

    import hwnoise.models
    from hwnoise.rewards import correctness_reward
    from hwnoise.rl.run import _dataset, _grpo_config, _problems, build_trainer

    model, tokenizer = hwnoise.models.load("default")  # a fresh copy: every run starts alike
    config = _config(f"{tmp}/{setting}", aqn=setting != "plain TRL",
                     weight_format="mxfp4" if setting == "+MXFP4" else None, steps=steps)
    extra = {"generation_kwargs": {"min_new_tokens": MAX_TOKENS}}
    if setting == "plain TRL":
        train, _ = _problems(config)
        return GRPOTrainer(model=model, reward_funcs=[correctness_reward(config.reward.mode)],
                           args=_grpo_config(config, "cpu", **extra), train_dataset=_dataset(train, tokenizer),
                           processing_class=tokenizer, callbacks=[timer.callback])
    return build_trainer(config, model, tokenizer, callbacks=[timer.callback], grpo_args=extra)


def _aqn_cost(model, repeats: int = 20) -> float:
    from hwnoise.aqn import AQN, Constant

    aqn = AQN(Constant(1e-2))
    times = []
    for step in range(repeats):
        t0 = time.perf_counter()
        aqn.apply(model, step, repeats)
        aqn.restore(model)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--format", action="store_true", help="also time MXFP4 W4A16 rollouts + AQN")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import tempfile

    import transformers

    import hwnoise.models

    transformers.utils.logging.set_verbosity_error()
    settings = ["plain TRL", "hwnoise"] + (["+MXFP4"] if args.format else [])
    seconds = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for setting in settings:
                timer = StepTimer()
                trainer = _trainer(setting, 1 + args.steps, timer, f"{tmp}/r{round_}")
                trainer.remove_callback(transformers.PrinterCallback)
                trainer.train()
                seconds[setting] += timer.seconds[1:]  # the first step warms up
                print(f"round {round_ + 1}: {setting:<10} " + " ".join(f"{s:.2f}" for s in timer.seconds), flush=True)
                del trainer
    aqn_seconds = _aqn_cost(hwnoise.models.load("default")[0])

    base = statistics.median(seconds["plain TRL"])
    rows = []
    print(f"\nGRPO step, bundled SmolLM2-135M, {COMPLETIONS} completions x {MAX_TOKENS} tokens, CPU "
          f"({torch.get_num_threads()} threads), {args.rounds} rounds x {args.steps} timed steps")
    print(f"{'setting':<12}{'median s/step':>15}{'min':>8}{'max':>8}{'ratio':>8}")
    for setting in settings:
        values = seconds[setting]
        median = statistics.median(values)
        rows.append({"setting": setting, "median_s": median, "min_s": min(values), "max_s": max(values),
                     "ratio": median / base, "steps": values})
        print(f"{setting:<12}{median:>15.2f}{min(values):>8.2f}{max(values):>8.2f}{median / base:>8.3f}")
    print(f"\nAQN apply + restore alone (61 RMSNorm weights): {1e3 * aqn_seconds:.1f} ms "
          f"= {100 * aqn_seconds / base:.2f} % of a plain step (target <= 5 %)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "aqn_apply_restore_s": aqn_seconds, "threads": torch.get_num_threads(),
                       "completions": COMPLETIONS, "max_tokens": MAX_TOKENS}, f, indent=2)


if __name__ == "__main__":
    main()
