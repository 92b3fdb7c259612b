"""Training runs: the run spec (sections), the round state machine, the run manager, and its seams.

spec (run files), rounds (the pure state machine), participation, local_work, aggregation,
seams (one member of each per run), global_model (tensors by whole-model name), reports
(round reports checked and recorded), checkpoints, store (run records), run_manager.
"""
