"""Pretraining stages (main pretraining, annealing, later long-context) around megatron-core."""
