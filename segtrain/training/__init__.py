"""The training loop (``engine``) and what it runs with: the optimizer step's parts, LR schedules, EMA, early
stopping, the non-finite policy, signals, the run-directory lock, TensorBoard and the run's summary files."""
