#!/usr/bin/env bash
# Start an ALPS recipe on ONE machine of a (multi-)machine job: one `accelerate launch` per machine, no SLURM needed.
# Run it on every machine with the same settings and that machine's NODE_RANK; SLURM users take slurm_alps.sbatch,
# which calls this script once per node.
#
# Usage (from the repository root):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 GPUS_PER_NODE=8 launch/launch_node.sh --config recipes/<recipe>.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 GPUS_PER_NODE=8 launch/launch_node.sh --config recipes/<recipe>.yaml
# Arguments after the script name go to the recipe unchanged.
#
# Environment (defaults in brackets):
#   NNODES [1]              machines in the job
#   NODE_RANK [0]           this machine: 0 .. NNODES-1 (0 hosts the rendezvous)
#   MASTER_ADDR [127.0.0.1] address of machine 0, reachable from every machine
#   MASTER_PORT [29500]     free TCP port on machine 0
#   GPUS_PER_NODE [GPUs nvidia-smi lists, else 1]   processes started on this machine
#   ACCELERATE_CONFIG [recipes/accelerate_configs/multi_node.yaml]   e.g. fsdp2.yaml for FSDP2 across machines
#   RECIPE [recipes/sft_alps.py]   training script (recipes/dpo_alps.py for DPO)
#   RECIPE_CONFIG [unset]   recipe YAML, passed to the recipe as `--config RECIPE_CONFIG`
#   ACCELERATE_CMD [accelerate]   the accelerate CLI, e.g. "python -m accelerate.commands.accelerate_cli"
#   LOG_DIR [unset]         if set, output is also written to LOG_DIR/node<NODE_RANK>.log
#   ALPS_USE_CPU [0]        1: run the ranks on the CPU with gloo (smoke tests): adds --multi_gpu and sets
#                           ACCELERATE_USE_CPU=true, which TrainingArguments/Accelerator read to pick the CPU
#   DRY_RUN [0]             1: print the command and exit without running it
# The exact command is always printed first (prefixed with "+ ").
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() {
    echo "launch_node.sh: $*" >&2
    exit 2
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE=1
    if command -v nvidia-smi >/dev/null 2>&1; then
        detected="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
        if is_uint "$detected" && ((detected > 0)); then GPUS_PER_NODE="$detected"; fi
    fi
fi
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-$REPO_DIR/recipes/accelerate_configs/multi_node.yaml}"
RECIPE="${RECIPE:-$REPO_DIR/recipes/sft_alps.py}"
RECIPE_CONFIG="${RECIPE_CONFIG:-}"
ACCELERATE_CMD="${ACCELERATE_CMD:-accelerate}"
ALPS_USE_CPU="${ALPS_USE_CPU:-0}"
DRY_RUN="${DRY_RUN:-0}"

is_uint "$NNODES" && ((NNODES >= 1)) || die "NNODES must be a positive integer, got '$NNODES'."
is_uint "$NODE_RANK" || die "NODE_RANK must be a non-negative integer, got '$NODE_RANK'."
((NODE_RANK < NNODES)) || die "NODE_RANK=$NODE_RANK must be smaller than NNODES=$NNODES."
is_uint "$GPUS_PER_NODE" && ((GPUS_PER_NODE >= 1)) || die "GPUS_PER_NODE must be a positive integer, got '$GPUS_PER_NODE'."
is_uint "$MASTER_PORT" && ((MASTER_PORT > 0 && MASTER_PORT < 65536)) || die "MASTER_PORT must be a TCP port, got '$MASTER_PORT'."
[[ -f "$ACCELERATE_CONFIG" ]] || die "ACCELERATE_CONFIG '$ACCELERATE_CONFIG' does not exist."
[[ -f "$RECIPE" ]] || die "RECIPE '$RECIPE' does not exist."
[[ -z "$RECIPE_CONFIG" || -f "$RECIPE_CONFIG" ]] || die "RECIPE_CONFIG '$RECIPE_CONFIG' does not exist."

NUM_PROCESSES=$((NNODES * GPUS_PER_NODE))

cmd=()
if [[ "$ALPS_USE_CPU" == "1" ]]; then
    # accelerate only starts several local ranks through its multi-GPU launcher; the ranks then pick the CPU (gloo)
    # because of ACCELERATE_USE_CPU. `--cpu` instead would start independent single-process jobs.
    cmd+=(env ACCELERATE_USE_CPU=true)
fi
read -r -a launcher <<<"$ACCELERATE_CMD"
cmd+=("${launcher[@]}" launch
    --config_file "$ACCELERATE_CONFIG"
    --num_machines "$NNODES"
    --num_processes "$NUM_PROCESSES"
    --machine_rank "$NODE_RANK"
    --main_process_ip "$MASTER_ADDR"
    --main_process_port "$MASTER_PORT")
if [[ "$ALPS_USE_CPU" == "1" ]]; then
    cmd+=(--multi_gpu)
fi
cmd+=("$RECIPE")
if [[ -n "$RECIPE_CONFIG" ]]; then
    cmd+=(--config "$RECIPE_CONFIG")
fi
cmd+=("$@")

printf '+'
printf ' %q' "${cmd[@]}"
printf '\n'

if [[ "$DRY_RUN" == "1" ]]; then
    exit 0
fi
if [[ -n "${LOG_DIR:-}" ]]; then
    mkdir -p "$LOG_DIR"
    "${cmd[@]}" 2>&1 | tee "$LOG_DIR/node${NODE_RANK}.log"
    exit "${PIPESTATUS[0]}"
fi
exec "${cmd[@]}"
