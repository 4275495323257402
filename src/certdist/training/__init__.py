"""Training: schedules, the one training loop, regularisers, checkpoints."""
