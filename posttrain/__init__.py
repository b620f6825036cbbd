"""Post-training stages (``*_stage.py``: SFT, CoT fusion, deliberation rounds, RL with LaSeR, evaluate)
and the model-agnostic pieces they share (SFT data, chat sampling, fusion / deliberation logic, GRPO
and LaSeR maths, rollouts, inference-time scaling). A stage never imports another stage."""
