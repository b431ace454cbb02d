#!/usr/bin/env bash
# One call on a lent GPU machine: the GPU recipe or the throughput benchmark, results copied under $OUT.
#
#   bash bench/device_run.sh recipe [seconds]       # python -m train.default --profile gpu, bundle + summary
#   bash bench/device_run.sh throughput [seconds]   # python bench/pretrain_throughput.py --compile --other-attention --json
#
# Why a script: a session gets one machine for ~15 minutes in all, each command at most 600 s, and only files
# under $OUT come back (16 MiB each, 8 files). Each part stops itself after [seconds] (default 540) so there is
# time left to copy what it has; the recipe plans its stages for [seconds] less two minutes (start-up, the kNN
# monitor and the export are not in its plan; RECIPE_MINUTES overrides). A session's 15 minutes hold one call of
# the default length, not two: `recipe` run again on a still-warm machine resumes where it stopped (train.default
# skips finished stages and resumes checkpoints), but a machine given back starts bare.
#
# The machine has torch but not diffusers and no network: before the call, `bash bench/device_prepare.sh` fills
# the git-ignored device/ folder (wheels, NotoColorEmoji.ttf, emoji-test.txt); name it in `carry`. Here, with no
# device/ folder, the local environment is used as it is, e.g.
#   OUT=/tmp/out PROFILE=smoke PYTHON=.venv/bin/python bash bench/device_run.sh recipe
set -euo pipefail
part=${1:?usage: bash bench/device_run.sh recipe|throughput [seconds]}
budget=${2:-540}
out=${OUT:?set OUT to the folder whose files come back}
python=${PYTHON:-python3}
mkdir -p "$out"

if compgen -G "device/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --target /tmp/site device/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
[ -f device/NotoColorEmoji.ttf ] && export IJEPA_EMOJI_FONT=$PWD/device/NotoColorEmoji.ttf
[ -f device/emoji-test.txt ] && export IJEPA_EMOJI_TEST=$PWD/device/emoji-test.txt
[ -f device/code_version.txt ] && export IJEPA_CODE_VERSION="$(cat device/code_version.txt)"

log="$out/$part.log"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    "$python" -c "import timm; print('timm', timm.__version__, timm.__file__)" || true
    # without raqm, emoji sequences (skin tones, ZWJ) are dropped: another catalogue and held-out split than here
    "$python" -c "from PIL import features; print('Pillow raqm:', features.check('raqm'))" || true
    df -h /dev/shm 2>/dev/null || true  # DataLoader workers pass batches through it
    # fail in seconds, with the reason in the log, if a carried wheel or the machine's packages do not import
    "$python" -c "import train.default" || echo "import train.default failed: see above"
} > "$log" 2>&1

status=0
case $part in
    throughput)
        timeout "$budget" "$python" bench/pretrain_throughput.py --compile --other-attention --json \
            > "$out/throughput.jsonl" 2>> "$log" || status=$?
        ;;
    recipe)
        profile=${PROFILE:-gpu}
        run=runs/device_$profile
        # The planner fits the recipe into [seconds] less two minutes (7 minutes for the default 540 s) so that it
        # ends before `timeout` does: start-up, the kNN monitor and the export are not in its plan.
        minutes=${RECIPE_MINUTES:-$(( budget > 180 ? (budget - 120) / 60 : 1 ))}
        timeout "$budget" "$python" -m train.default --out-dir "$run" --profile "$profile" \
            --budget-minutes "$minutes" >> "$log" 2>&1 || status=$?
        [ -f "$run/summary.json" ] || echo "no summary.json: the recipe did not finish" >> "$log"
        # One archive in parts under the 16 MiB a file may have on its way back (8 files, 64 MiB in all): the
        # bundle without its reference bank (rebuilt here from the model: train.default.build_reference_bank),
        # each stage's seconds, the summary and the held-out kNN every 1000 steps (does length pay?).
        files=()
        for f in bundle stage_seconds.json summary.json pretrain/knn.csv; do
            [ -e "$run/$f" ] && files+=("$f")
        done
        if [ ${#files[@]} -gt 0 ]; then
            tar -C "$run" -czf - --exclude=bundle/bank.safetensors "${files[@]}" | split -b 15M - "$out/run.tar.gz.part-"
        fi
        ;;
    *)
        echo "unknown part '$part': recipe or throughput" >&2
        exit 2
        ;;
esac
# tqdm redraws its bar in place: drop its redraws (keeping the header, the plans and every logged line) and
# keep the log small.
tr '\r' '\n' < "$log" | grep -v '^\s*$' | grep -vE '[0-9]+/[0-9]+ \[' | tail -n 400 > "$log.tmp" \
    && mv "$log.tmp" "$log"
echo "$part finished with status $status (124 = stopped at ${budget} s; on a machine still warm, run it again to" \
    "resume)" | tee -a "$log"
exit "$status"
