"""Agent simulations: a YAML spec, a world of places and agents, memories, batched steps, atomic checkpoints."""
