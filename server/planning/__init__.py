"""Planning: the coordinator, the model source, and the assignment planner."""
