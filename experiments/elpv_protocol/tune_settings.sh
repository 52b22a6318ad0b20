#!/usr/bin/env bash
# Step 1b of experiments/elpv_protocol/README.md: the tuning sweeps of the data-efficiency and shift
# settings, at split 42 and seed 0, each arm over its lr grid. Run from the repository root, alone on
# the machine; a relaunch skips every job that already FINISHED in the experiment's store, so stop it
# (Ctrl-C) and start it again on another day. PYTHON overrides the interpreter (default .venv's).
set -euo pipefail
python=${PYTHON:-.venv/bin/python}
train() { "$python" -m transferlab.train -m experiment=elpv_protocol "$@"; }
FE=1e-4,3e-4,1e-3,3e-3,1e-2 FT=1e-4,3e-4,1e-3 LPFT=3e-5,1e-4,3e-4

# Data efficiency: N training images per class, epochs scaled so that 20 images still get tens of
# updates (every arm alike, lp_ft's probe stage included).
for pair in 10:50 30:30 100:15; do
    n=${pair%:*} epochs=${pair#*:}
    setting=(data.train_per_class="$n" trainer.epochs="$epochs")
    train "${setting[@]}" mode=feature_extract optimizer.lr=$FE
    train "${setting[@]}" mode=full_finetune optimizer.lr=$FT
    train "${setting[@]}" mode=lp_ft mode.probe_epochs="$epochs" optimizer.lr=$LPFT
done

# Distribution shift: train, validate and test on monocrystalline cells; also test on every
# polycrystalline one. The main protocol's epochs.
shift=(data.cell_type=mono data.shift_cell_type=poly)
train "${shift[@]}" mode=feature_extract optimizer.lr=$FE trainer.epochs=30
train "${shift[@]}" mode=full_finetune optimizer.lr=$FT
train "${shift[@]}" mode=lp_ft optimizer.lr=$LPFT

# The grid rule (README: an arm's choice at the edge of its grid and strictly better on validation than
# the next value inside extends the grid by one value), applied 2026-12-02 07:56-07:58 UTC on the
# validation numbers of the sweeps above; each line is what the rule asked for, in order.
train data.train_per_class=10 trainer.epochs=50 mode=feature_extract optimizer.lr=3e-2,1e-1
train data.train_per_class=30 trainer.epochs=30 mode=feature_extract optimizer.lr=3e-2,1e-1
train "${shift[@]}" mode=feature_extract optimizer.lr=3e-2 trainer.epochs=30
# Asked for by the rule on the fine-tuning arms (a few minutes each), run 2026-12-02 14:04-14:27 UTC:
train data.train_per_class=10 trainer.epochs=50 mode=full_finetune optimizer.lr=3e-3
train data.train_per_class=30 trainer.epochs=30 mode=lp_ft mode.probe_epochs=30 optimizer.lr=1e-3
train data.train_per_class=100 trainer.epochs=15 mode=full_finetune optimizer.lr=3e-3
