"""Post-training stages: SFT (``sft_stage``); CoT fusion, deliberation and RL are not implemented yet."""
