"""Stage kinds the pipeline can run: ``kind`` in a ``stage/`` config -> the module implementing it.

Each module exposes ``run(ctx: megatron_ext.stage.StageContext) -> StageResult``. Names only, so the
launcher can validate a config without importing torch or megatron-core.
"""

STAGE_KINDS = {
    "pretrain": "pretrain.pretrain_stage",
    "sft": "posttrain.sft_stage",
    "cot_fusion": "posttrain.cot_fusion_stage",
    "deliberation": "posttrain.deliberation_stage",
    "rl": "posttrain.rl_stage",
    "evaluate": "posttrain.evaluate_stage",
}
