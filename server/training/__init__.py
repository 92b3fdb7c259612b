"""Training runs: the run spec, the round state machine, the run manager, aggregation, checkpoints."""
