"""Hydra discovers transferlab's Optuna sweeper here (``hydra/sweeper=study``); the work is in
:mod:`transferlab.study`, imported only when a sweep starts: Hydra imports every plugin module at
start-up, including ``python -m transferlab.train --help``, which must stay fast."""
