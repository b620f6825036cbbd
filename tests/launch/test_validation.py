"""Bad configs fail before any process starts, with the field and the fix in the message."""

import json
import subprocess
import sys
import time

import pytest

from launch.config import load_config
from launch.validation import validate
from megatron_ext.errors import ConfigError


def check(overrides, *fragments):
    with pytest.raises(ConfigError) as err:
        validate(load_config(overrides))
    for fragment in fragments:
        assert fragment in str(err.value)
    return str(err.value)


def test_default_config_is_valid():
    sizes = validate(load_config([]))
    assert sizes == {"tp": 1, "pp": 1, "ep": 1, "dp": 1, "cp": 1, "world": 1}


def test_tensor_parallel_must_divide_heads():
    msg = check(["parallel.tensor_model_parallel_size=3", "parallel.nproc_per_node=3"],
                "model.num_attention_heads=4", "parallel.tensor_model_parallel_size=3")
    assert "[1, 2, 4]" in msg


def test_experts_must_divide_expert_parallel():
    check(["parallel=ep2", "model.num_moe_experts=3", "model.moe_router_topk=1"],
          "model.num_moe_experts=3", "parallel.expert_model_parallel_size=2")


def test_layers_must_divide_pipeline_parallel():
    check(["parallel.pipeline_model_parallel_size=2", "parallel.nproc_per_node=2", "model.num_layers=3"],
          "model.num_layers=3", "parallel.pipeline_model_parallel_size=2")


def test_world_size_must_fit_layout():
    check(["parallel.tensor_model_parallel_size=2"], "world size 1", "nproc_per_node")


def test_expert_parallel_needs_data_parallel_room():
    check(["parallel=tp2", "parallel.expert_model_parallel_size=2"],
          "parallel.expert_model_parallel_size=2", "data-parallel x context-parallel size 1")


def test_tp_comm_overlap_needs_sequence_parallelism():
    check(["parallel.tp_comm_overlap=true"], "parallel.tp_comm_overlap=true", "sequence_parallel=true")
    check(["parallel=tp2", "parallel.tp_comm_overlap=true", "parallel.sequence_parallel=false"],
          "parallel.sequence_parallel=true")
    validate(load_config(["parallel=tp2", "parallel.tp_comm_overlap=true"]))


def test_unknown_stage_in_order():
    check(["pipeline.order=[pretrain,distill]"], "unknown stage 'distill'")


def test_sft_stage_needs_no_data_mix_but_a_valid_tasks_section():
    cfg = load_config([])
    assert "mix" not in cfg.stages.sft and "sft" in cfg.pipeline.order
    validate(cfg)
    check(["stages.sft.tasks.kinds=[riddles]"], "stages.sft.tasks.kinds=['riddles']", "arithmetic")
    check(["stages.sft.tasks.held_out_fraction=0.0"], "stages.sft.tasks.held_out_fraction=0.0")
    check(["stages.sft.tasks.thinking=medium"], "stages.sft.tasks.thinking='medium'", "short")


def test_sampling_stages_check_their_sections():
    check(["pipeline.order=[cot_fusion]"], "stages.cot_fusion", "samples from a trained model", "init_from")
    check(["stages.cot_fusion.prompts.kinds=[riddles]"], "stages.cot_fusion.prompts.kinds=['riddles']")
    check(["stages.cot_fusion.fusion.easy_threshold=0"], "stages.cot_fusion.fusion.easy_threshold=0")
    check(["stages.cot_fusion.fusion.hard_fallback=keep"], "stages.cot_fusion.fusion.hard_fallback='keep'")
    check(["stages.cot_fusion.sampling.temperature=-1"], "stages.cot_fusion.sampling.temperature=-1")
    check(["stages.deliberation_1.references=[deliberation_2]"], "stages.deliberation_1.references",
          "'deliberation_2'", "earlier stage")
    check(["stages.deliberation_1.references=[]"], "stages.deliberation_1.references is empty")
    check(["stages.deliberation_2.weak_share=1.5"], "stages.deliberation_2.weak_share=1.5")


def test_rl_stages_check_their_rollout_shape():
    check(["pipeline.order=[rl_stem]"], "stages.rl_stem", "trained policy")
    check(["stages.rl_stem.rl.group_size=1"], "stages.rl_stem.rl.group_size=1", ">= 2")
    check(["stages.rl_stem.rl.groups=3"], "rl.groups x rl.group_size = 24", "global_batch_size=32")
    check(["stages.rl_stem.train.save_interval=3"], "stages.rl_stem.train.save_interval=3", "2 updates per rollout")
    check(["stages.rl_general.rl.kl_coef=-1"], "stages.rl_general.rl.kl_coef=-1")
    check(["+stages.rl_stem.prompts.sources.web={weight: 1}"], "stages.rl_stem.prompts.sources", "'web'")
    check(["stages.rl_stem.sampling.temperature=0"], "stages.rl_stem.sampling.temperature=0")
    check(["+stages.rl_stem.prompts.sources.math_file={weight: 1, path: /nonexistent.jsonl}"],
          "stages.rl_stem.prompts.sources.math_file.path='/nonexistent.jsonl'", "no such file")


def test_rl_stages_refuse_laser_warmups_that_outlast_the_stage():
    # rl_stem: 30 steps, warm-ups 4 + 10; rl_general: 10 steps, 0 + 4
    validate(load_config([]))
    check(["stages.rl_stem.laser.loss_warmup_steps=30"], "stages.rl_stem.laser.loss_warmup_steps=30",
          "train.steps=30", "never start")
    check(["stages.rl_stem.laser.adv_warmup_steps=26"], "loss_warmup_steps + adv_warmup_steps = 4 + 26",
          "never enter the advantages")
    check(["stages.rl_general.train.steps=4"], "stages.rl_general.laser", "0 + 4 >= train.steps=4")
    validate(load_config(["stages.rl_stem.laser.adv_warmup_steps=26", "stages.rl_stem.laser.adv_coef=0"]))
    validate(load_config(["stages.rl_stem.laser.loss_warmup_steps=30", "stages.rl_stem.laser.enabled=false"]))
    check(["stages.rl_stem.laser.beta=0"], "stages.rl_stem.laser.beta=0")
    check(["stages.rl_stem.laser.adv_coef=1.5"], "stages.rl_stem.laser.adv_coef=1.5")
    check(["stages.rl_stem.laser.adv_warmup_steps=-1"], "stages.rl_stem.laser.adv_warmup_steps=-1")


def test_parent_names_an_earlier_stage_and_branches_the_run(tmp_path):
    from launch.pipeline_jobs import parent_checkpoint

    check(["+stages.rl_stem.parent=evaluate"], "stages.rl_stem.parent='evaluate'", "before 'rl_stem'")
    check(["+stages.rl_stem.parent=distill"], "stages.rl_stem.parent='distill'")
    check(["+stages.rl_stem.parent=sft", f"stages.rl_stem.init_from={tmp_path}"], "parent or init_from, not both")
    cfg = load_config(["+stages.rl_stem.parent=sft"])
    validate(cfg)
    with pytest.raises(ConfigError, match="starts from 'sft', which has not completed"):   # not the previous stage
        parent_checkpoint(tmp_path, cfg, "rl_stem")
    sft = tmp_path / "04_sft"
    sft.mkdir()
    (sft / "manifest.json").write_text(json.dumps({"status": "complete", "checkpoint": "checkpoints/iter_0000240"}))
    assert parent_checkpoint(tmp_path, cfg, "rl_stem") == str(sft / "checkpoints/iter_0000240")


def test_real_size_rl_presets_make_one_update_per_rollout_like_laser():
    # LaSeR: 128 prompts x 8 samples, one on-policy update of the whole rollout per step
    for stage in ("rl_stem_turbos", "rl_general_turbos"):
        cfg = load_config([f"+stage@stages.x={stage}"])
        st = cfg.stages.x
        assert st.rl.groups * st.rl.group_size == st.train.global_batch_size == 1024 and st.rl.epochs == 1
        assert st.laser.loss_warmup_steps + st.laser.adv_warmup_steps < st.train.steps
        assert st.laser.adv_warmup_steps == 200


def test_unknown_stage_kind():
    check(["stages.anneal.kind=distill"], "stages.anneal.kind='distill'", "pretrain")


def test_missing_data_path():
    check(["+data.sources.web={path: /nonexistent/web.jsonl, text_key: text}"],
          "data.sources.web.path='/nonexistent/web.jsonl'", "does not exist")


def test_missing_tokenizer_path():
    check(["data.tokenizer.path=/nonexistent/tok"], "data.tokenizer.path")


def test_missing_parent_checkpoint():
    check(["stages.anneal.init_from=/nonexistent/ckpt"], "stages.anneal.init_from", "parent checkpoint not found")


def test_unknown_mix():
    check(["stages.pretrain.mix=web"], "stages.pretrain.mix='web'")


def test_global_batch_must_split_into_micro_batches():
    check(["stages.pretrain.train.micro_batch_size=8", "stages.pretrain.train.global_batch_size=12"],
          "stages.pretrain.train.global_batch_size=12")
    check(["parallel=dp2", "stages.pretrain.train.global_batch_size=15"],
          "stages.pretrain.train.micro_batch_size=null", "global_batch_size=15")


def test_wsd_needs_decay_steps():
    check(["stages.pretrain.train.lr_decay_style=WSD"], "stages.pretrain.train.wsd_decay_steps")


def test_bad_config_fails_fast_from_the_command_line(tmp_path):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "launch", f"run_dir={tmp_path / 'run'}",
         "parallel.tensor_model_parallel_size=3", "parallel.nproc_per_node=3"],
        capture_output=True, text=True, timeout=60,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2
    assert "config error: model.num_attention_heads=4" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 15
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("0*"))


def test_expert_lr_manual_needs_a_scale():
    check(["stages.pretrain.train.expert_lr.mode=manual"], "stages.pretrain.train.expert_lr.scale")


def test_cla_group_must_not_straddle_pipeline_stages():
    check(["parallel.pipeline_model_parallel_size=2", "parallel.nproc_per_node=2", "model.num_layers=6"],
          "model.cla_share_factor", "straddles a pipeline stage boundary")


def test_recycle_routing_needs_a_capacity_factor():
    check(["model.moe_expert_capacity_factor=null"], "model.moe_routing_mode=recycle", "capacity_factor")


def test_unknown_routing_mode():
    check(["model.moe_routing_mode=greedy"], "model.moe_routing_mode='greedy'")


def test_virtual_pipeline_needs_whole_layers_per_chunk():
    check(["parallel=pp2_vpp2", "model.num_layers=6", "model.cla_share_factor=1"],
          "parallel.virtual_pipeline_model_parallel_size=2")


def test_cla_groups_must_fit_virtual_pipeline_chunks():
    check(["parallel=pp2_vpp2"], "model.cla_share_factor", "straddles")


def test_virtual_pipeline_is_valid_for_single_layer_chunks():
    validate(load_config(["parallel=pp2_vpp2", "model.cla_share_factor=1"]))


@pytest.mark.parametrize("model", ["tiny_large", "tiny_turbos"])
@pytest.mark.parametrize("layout, sizes", [("cp2", (1, 1, 2)), ("tp2_cp2", (2, 1, 2))])
def test_context_parallel_presets_are_valid(model, layout, sizes):
    got = validate(load_config([f"model={model}", f"parallel={layout}"]))
    assert (got["tp"], got["dp"], got["cp"]) == sizes


def test_context_parallel_needs_sequences_in_2_x_cp_x_tp_chunks():
    # TP2 x CP2 with sequence parallelism: 8 pieces per sequence; the long-context stage's own length
    check(["parallel=tp2_cp2", "stages.long_context.model_overrides.seq_length=260"],
          "stages.long_context.model_overrides.seq_length=260", "2 x context_parallel_size x "
          "tensor_model_parallel_size = 8", "264")


def test_context_parallel_world_size_and_expert_layout():
    check(["parallel=cp2", "parallel.nproc_per_node=3"], "world size 3",
          "context_parallel_size = 2")
    # experts spread over data x context ranks: CP2 x DP1 holds EP2, not EP4
    validate(load_config(["parallel=cp2", "parallel.expert_model_parallel_size=2"]))
    check(["parallel=cp2", "parallel.expert_model_parallel_size=4"], "expert_model_parallel_size=4",
          "data-parallel x context-parallel size 2")


def test_context_parallel_refuses_attention_dropout():
    check(["parallel=cp2", "model.attention_dropout=0.1"], "model.attention_dropout=0.1", "context parallelism")


def test_mamba_heads_and_groups_must_split_over_tp_x_cp():
    check(["model=tiny_turbos", "parallel=cp2", "parallel.context_parallel_size=4", "parallel.nproc_per_node=4",
           "model.mamba_num_heads=6", "model.mamba_num_groups=2"],
          "model.mamba_num_heads=6", "1 x 4")
    # 3 groups on one TP rank cannot be split over, nor repeated across, 2 CP ranks
    check(["model=tiny_turbos", "parallel=cp2", "model.mamba_num_heads=6", "model.mamba_num_groups=3"],
          "model.mamba_num_groups=3", "context_parallel_size=2")


def test_context_parallel_stage_layouts():
    from megatron_ext.stage import stage_parallel_config

    cfg = load_config(["parallel=cp2"])
    assert stage_parallel_config(cfg, "long_context").context_parallel_size == 2
    # post-training kinds run the CP ranks as data parallel
    assert stage_parallel_config(cfg, "sft").context_parallel_size == 1
    # a pretraining-kind stage may choose its own CP size (the world size stays)
    cfg = load_config(["parallel=dp2", "stages.long_context.parallel_overrides.context_parallel_size=2"])
    assert stage_parallel_config(cfg, "long_context").context_parallel_size == 2
    assert stage_parallel_config(cfg, "pretrain").context_parallel_size == 1
    validate(cfg)
    check(["parallel=dp2", "stages.long_context.parallel_overrides.context_parallel_size=2",
           "stages.long_context.model_overrides.seq_length=250"], "stages.long_context.model_overrides.seq_length=250")
    check(["parallel=dp2", "+stages.sft.parallel_overrides={context_parallel_size: 2}"],
          "stages.sft.parallel_overrides.context_parallel_size=2", "remove the override")
    check(["+stages.pretrain.parallel_overrides.tensor_model_parallel_size=2"],
          "stages.pretrain.parallel_overrides.tensor_model_parallel_size")


@pytest.mark.parametrize("model", ["hunyuan_turbos", "hunyuan_large"])
def test_real_size_256k_stage_runs_context_parallel_8(model):
    from megatron_ext.stage import stage_model_config, stage_parallel_config

    overrides = [f"model={model}", "parallel=h200_node", "pipeline=turbos_pretrain", "pipeline.order=[long_context_256k]"]
    cfg = load_config([*overrides, "parallel.nnodes=16"])
    validate(cfg)
    assert stage_parallel_config(cfg, "long_context_256k").context_parallel_size == 8
    assert stage_model_config(cfg, "long_context_256k").seq_length == 256 * 1024
    # one 8-GPU node cannot hold TP2 x CP8
    check([*overrides, "parallel.nnodes=1"], "world size 8", "context_parallel_size = 16")


def test_warmup_must_leave_a_step_for_the_schedule():
    """Found by a new user: warmup_steps == steps passed validation and the stage then died in
    megatron-core's OptimizerParamScheduler (assert lr_warmup_steps < lr_decay_steps)."""
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    check(["stages.pretrain.train.steps=1", "stages.pretrain.train.warmup_steps=1"],
          "stages.pretrain.train.warmup_steps=1", "steps - 1 = 0")
    validate(load_config(["stages.pretrain.train.steps=2", "stages.pretrain.train.warmup_steps=1"]))

    def schedule(steps, warmup):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return OptimizerParamScheduler(opt, init_lr=0.0, max_lr=0.1, min_lr=0.0, lr_warmup_steps=warmup,
                                       lr_decay_steps=steps, lr_decay_style="cosine", start_wd=0.0, end_wd=0.0,
                                       wd_incr_steps=steps, wd_incr_style="constant")

    for steps, warmup in ((1, 0), (2, 1)):   # the edges validation lets through: megatron-core accepts them
        schedule(steps, warmup)
    with pytest.raises(AssertionError):      # the edge it refuses
        schedule(1, 1)


def test_full_recompute_must_replay_whole_cla_groups():
    """A recompute unit that splits a CLA group would be refused by the model build, after submission
    (the long-context stage presets recompute 2 layers at a time for Hunyuan-Large's groups of 2)."""
    check(["model.recompute_granularity=full", "model.recompute_method=uniform", "model.recompute_num_layers=1"],
          "stages.pretrain", "recompute_num_layers=1", "cla_share_factor=2", "multiple of 2")
    check(["model.recompute_granularity=full", "model.recompute_method=block", "model.recompute_num_layers=2"],
          "recompute_method='block'", "whole CLA groups")
