"""Post-training stages (SFT, CoT fusion, deliberation, RL); none are implemented yet."""
