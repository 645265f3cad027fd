#!/usr/bin/env bash
# The research grid in upstream verl 0.9.x: Qwen2.5-1.5B-Instruct, GRPO on GSM8K, one node of 8 GPUs.
#
#   examples/verl/grid.sh RUN [more verl overrides...]        runs it
#   PRINT=1 examples/verl/grid.sh RUN                         prints the command line only
#
# RUN: clean | noise5 | noise5-aqn | mxfp4 | mxfp4-aqn | nvfp4 | nvfp4-aqn, each also with -lora
# (e.g. mxfp4-aqn-lora). Environment: MODEL, DATA (the parquet files of verl's
# examples/data_preprocess/gsm8k.py), GPUS, EPOCHS, OUT.
set -euo pipefail
RUN=${1:?"run name: clean | noise5 | noise5-aqn | mxfp4 | mxfp4-aqn | nvfp4 | nvfp4-aqn (each also -lora)"}
shift
MODEL=${MODEL:-Qwen/Qwen2.5-1.5B-Instruct}
DATA=${DATA:-$HOME/data/gsm8k}
GPUS=${GPUS:-8}
EPOCHS=${EPOCHS:-2}
OUT=${OUT:-checkpoints/hwnoise-verl}
R=+actor_rollout_ref.rollout.custom.hwnoise
LR=1e-6
[[ "$RUN" == *-lora ]] && LR=3e-5  # LoRA trains far fewer weights: the usual 30x larger learning rate

BASE=(
  algorithm.adv_estimator=grpo algorithm.use_kl_in_reward=False
  algorithm.rollout_correction.rollout_is=token            # verl's TIS: rollout (noisy) vs actor log-probs
  data.train_files="$DATA/train.parquet" data.val_files="$DATA/test.parquet"
  data.train_batch_size=128 data.max_prompt_length=512 data.max_response_length=1024
  actor_rollout_ref.model.path="$MODEL"
  actor_rollout_ref.actor.optim.lr="$LR" actor_rollout_ref.actor.ppo_mini_batch_size=64
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8
  actor_rollout_ref.actor.use_kl_loss=True actor_rollout_ref.actor.kl_loss_coef=0.001
  actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.n=5
  actor_rollout_ref.rollout.tensor_model_parallel_size=1 actor_rollout_ref.rollout.gpu_memory_utilization=0.6
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16
  actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16
  trainer.n_gpus_per_node="$GPUS" trainer.nnodes=1 trainer.total_epochs="$EPOCHS"
  trainer.test_freq=5 trainer.save_freq=-1 trainer.val_before_train=True
  trainer.logger=[console,tensorboard] trainer.project_name=hwnoise-verl trainer.experiment_name="$RUN"
  trainer.default_local_dir="$OUT/$RUN"
)
# 5 % relative noise on every matmul (forward and backward) in every worker; eager vLLM so each
# forward draws afresh (CUDA graphs would replay one draw).
NOISE=(+trainer.hwnoise.emulation=relative:0.05@ops actor_rollout_ref.rollout.enforce_eager=True)
# Epoch-aware AQN on the rollout engine's RMSNorm weights (QeRL's staged decay, restarted each epoch).
AQN=("$R.aqn.enabled=true" "$R.aqn.schedule=epoch_aware" "$R.aqn.sigma_start=0.01" "$R.aqn.sigma_end=0.0005"
     "$R.aqn.stages=5")
LORA=(actor_rollout_ref.model.lora_rank=32 actor_rollout_ref.model.lora_alpha=64
      actor_rollout_ref.model.target_modules=all-linear)
# LoRA syncs only adapters after the base is in vLLM (verl's base_sync_done). With a weight format
# the base must pass hwnoise's stream once: load_format=dummy (vLLM starts empty, the first sync
# sends the base, quantized; the adapters stay unquantized, as in QLoRA). Without one, vLLM may
# load the base itself (safetensors, faster). hwnoise refuses a weight format with safetensors.

VARIANT=${RUN%-lora}
case "$VARIANT" in
  clean)      H=() ;;
  noise5)     H=("${NOISE[@]}") ;;
  noise5-aqn) H=("${NOISE[@]}" "${AQN[@]}") ;;
  mxfp4)      H=("$R.emulation=weights:mxfp4") ;;
  mxfp4-aqn)  H=("$R.emulation=weights:mxfp4" "${AQN[@]}") ;;
  nvfp4)      H=("$R.emulation=weights:nvfp4") ;;
  nvfp4-aqn)  H=("$R.emulation=weights:nvfp4" "${AQN[@]}") ;;
  *) echo "unknown run '$RUN'; known: clean noise5 noise5-aqn mxfp4 mxfp4-aqn nvfp4 nvfp4-aqn (each also -lora)" >&2
     exit 2 ;;
esac
if [[ "$RUN" == *-lora ]]; then
  H+=("${LORA[@]}")
  case "$VARIANT" in
    mxfp4*|nvfp4*) H+=(actor_rollout_ref.rollout.load_format=dummy) ;;
    *)             H+=(actor_rollout_ref.rollout.load_format=safetensors) ;;
  esac
fi

CMD=(python -m hwnoise.integrations.verl.main_ppo "${BASE[@]}" "${H[@]}" "$@")
if [[ -n "${PRINT:-}" ]]; then
  printf '%q ' "${CMD[@]}"; echo
else
  exec "${CMD[@]}"
fi
