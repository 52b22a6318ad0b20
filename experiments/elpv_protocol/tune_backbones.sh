#!/usr/bin/env bash
# Written 2026-12-03; Lite1's loop ran that day, Lite2's not yet (README, "What has run"). The main
# protocol's four arms on the other bundled backbones,
# EfficientNet-Lite1 and Lite2, tuned the same way (each arm's lr grid at split 42, seed 0, with the
# values the grid rule added on Lite0 included from the start: 3e-2 for feature_extract, 3e-3 for
# full_finetune; the rule decides any further extension, on validation only). Then step 2's replicate command
# (README) replicates every new winner on splits 43 and 44, and step 3's report pairs the arms per
# backbone. Per backbone: 6 feature-extraction runs (seconds each on cached features) and 10
# fine-tuning runs (Lite0's took 8-13 min on the project's 2-core CPU, Lite1's 11-24 min; Lite2 is larger),
# so several hours each, before the replicates; add trainer.device=cuda on a GPU (new runs, kept
# apart by the report's trainer.device column: `bash experiments/elpv_protocol/tune_backbones.sh
# trainer.device=cuda`, every argument is passed to each sweep). Run from the repository root,
# alone on the machine; a relaunch skips every job that already FINISHED in the experiment's store.
# PYTHON overrides the interpreter (default .venv's).
set -euo pipefail
python=${PYTHON:-.venv/bin/python}
extra=("$@")
train() { "$python" -m transferlab.train -m experiment=elpv_protocol "$@" "${extra[@]}"; }

for backbone in efficientnet_lite1 efficientnet_lite2; do
    train backbone="$backbone" mode=feature_extract optimizer.lr=1e-4,3e-4,1e-3,3e-3,1e-2,3e-2 trainer.epochs=30
    train backbone="$backbone" mode=lp_ft optimizer.lr=3e-5,1e-4,3e-4
    train backbone="$backbone" mode=full_finetune optimizer.lr=1e-4,3e-4,1e-3,3e-3
    train backbone="$backbone" mode=partial optimizer.lr=1e-4,3e-4,1e-3
done
# The grid rule's extensions, decided on validation only after the loop's runs:
train backbone=efficientnet_lite1 mode=partial optimizer.lr=3e-3  # Lite1 partial: 1e-3 won at the edge
