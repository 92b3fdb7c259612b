"""Training runs: the run spec (sections), the round state machine, the run manager, and its seams.

spec (run files), rounds (the pure state machine), participation, local_work (with work,
work_samples, work_time and device_limits), aggregation, seams (one member of each per run),
global_model (tensors by whole-model name), reports (round reports checked and recorded), idle
(busy, bubble and waiting time per device), checkpoints, store (run records), run_manager.
"""
