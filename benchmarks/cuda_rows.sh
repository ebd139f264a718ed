#!/usr/bin/env bash
# The CUDA rows of `make bench`, and the GPU preset through the command line, on a machine with a GPU.
#
#   bash benchmarks/cuda_rows.sh OUT [ACCELERATOR]
#
# Writes OUT/expert_conv.md, OUT/train_step.md, OUT/layer_strategies.md, OUT/inference.md (the
# benchmarks' CUDA sections) and OUT/fit.log: the demo's teacher and LoRKD student trained for two
# epochs each with configs/trainer/gpu_ddp_bf16 (DDP, bf16 mixed precision), tested, and one region
# exported.
# ACCELERATOR (default gpu) lets the fit part run on a machine without one (cpu): a dry run of the script.
# PARTS (default fit,expert_conv,train_step,layer_strategies,inference) runs only the parts it names,
# e.g. PARTS=fit.
# Each part has its own time limit, so one that hangs leaves the others' results.
set -u
out=$(realpath -m "${1:?usage: cuda_rows.sh OUT [ACCELERATOR]}")
accelerator=${2:-gpu}
parts=",${PARTS:-fit,expert_conv,train_step,layer_strategies,inference},"
wanted() { [[ $parts == *",$1,"* ]]; }
py=${PYTHON:-python3}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline

{ nvidia-smi -L 2>/dev/null; "$py" -c "import torch, lightning; print('torch', torch.__version__, \
'lightning', lightning.__version__, 'cuda', torch.version.cuda)"; } | tee "$out/machine.txt"

work=$(mktemp -d)
cd "$work"
if wanted fit; then
    (
        set -e
        trainer=(--config "trainer/gpu_ddp_bf16" --trainer.max_epochs 2)
        [ "$accelerator" = gpu ] || trainer=(--trainer.max_epochs 2 --data.init_args.samples_per_epoch 8)
        export LORKD_PL_DEMO_DATA="$work/data"
        timeout 90 lorkd-pl demo-data --out "$work/data"
        timeout 90 lorkd-pl fit --config demo/teacher_seg "${trainer[@]}"
        timeout 90 lorkd-pl fit --config demo/lorkd_seg "${trainer[@]}"
        timeout 90 lorkd-pl test --config demo/lorkd_seg "${trainer[@]}" --ckpt_path last
        timeout 90 lorkd-pl export --ckpt runs/demo/lorkd_seg/latest/checkpoints/last.ckpt --region brain --out export/brain
        ls export/brain
    ) > "$out/fit.log" 2>&1
    echo "fit, test, export on $accelerator: exit $?" | tee -a "$out/fit.log"
    tail -n 25 "$out/fit.log"
fi

if [ "$accelerator" = gpu ]; then
    cd "$repo/benchmarks"
    if wanted expert_conv; then
        timeout 200 "$py" expert_conv.py --device cuda --output "$out/expert_conv.md" || echo "expert_conv: exit $?"
    fi
    if wanted train_step; then
        timeout 150 "$py" train_step.py --device cuda --budget 1.5 --output "$out/train_step.md" \
            || echo "train_step: exit $?"
    fi
    if wanted layer_strategies; then
        timeout 200 "$py" layer_strategies.py --device cuda --output "$out/layer_strategies.md" \
            || echo "layer_strategies: exit $?"
    fi
    if wanted inference; then
        timeout 60 "$py" inference.py --device cuda --output "$out/inference.md" || echo "inference: exit $?"
    fi
fi
