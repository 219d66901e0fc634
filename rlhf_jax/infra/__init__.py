"""What every stage stands on: mesh, processes, sharding, state, checkpoints, metrics,
preemption, provenance."""
