"""Check a resolved config before any process starts.

Pure Python over the config (no torch / megatron-core import), so a bad config fails in about a
second. Every error names the field as it is spelled on the command line and says how to fix it.
Only the first problem found is reported: fixing it and re-running shows the next.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

from launch.stages import STAGE_KINDS
from megatron_ext.batch_sizes import micro_batch_size
from megatron_ext.errors import ConfigError
from megatron_ext.expert_lr import expert_lr_scale
from megatron_ext.stage import stage_model_config, stage_parallel_config

LR_DECAY_STYLES = ("cosine", "linear", "constant", "WSD")


def divisors(n: int, limit: int | None = None) -> list[int]:
    """Divisors of ``n`` (up to ``limit``): the sizes a parallel dimension can take."""
    return [d for d in range(1, n + 1) if n % d == 0 and (limit is None or d <= limit)]


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field}={value!r}: must be a positive integer")
    return value


def _non_negative_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{field}={value!r}: must be an integer >= 0")
    return value


def _number(value: Any, field: str, low: float, high: float = float("inf"), *, low_open: bool = False,
            high_open: bool = False) -> float:
    """A real number in the interval [low, high] (an end excluded where ``*_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{field}={value!r}: must be a number in {interval}")
    return float(value)


def _optional_positive_int(model: Mapping, key: str, meaning: str) -> None:
    """``model.<key>``: null (``meaning``) or a positive integer."""
    if model.get(key) is not None:
        try:
            _positive_int(model[key], f"model.{key}")
        except ConfigError as err:
            raise ConfigError(f"{err}, or null ({meaning})") from None


def _divides(n: int, n_field: str, d: int, d_field: str) -> None:
    if n % d:
        raise ConfigError(
            f"{n_field}={n} is not divisible by {d_field}={d}: choose {d_field} from {divisors(n)} "
            f"or change {n_field}"
        )


def validate_parallel(model: Mapping, parallel: Mapping) -> dict[str, int]:
    """Divisibility rules of megatron-core's layouts; returns the derived sizes."""
    tp = _positive_int(parallel["tensor_model_parallel_size"], "parallel.tensor_model_parallel_size")
    pp = _positive_int(parallel["pipeline_model_parallel_size"], "parallel.pipeline_model_parallel_size")
    ep = _positive_int(parallel["expert_model_parallel_size"], "parallel.expert_model_parallel_size")
    nproc = _positive_int(parallel["nproc_per_node"], "parallel.nproc_per_node")
    nnodes = _positive_int(parallel.get("nnodes", 1), "parallel.nnodes")
    heads = _positive_int(model["num_attention_heads"], "model.num_attention_heads")
    _divides(heads, "model.num_attention_heads", tp, "parallel.tensor_model_parallel_size")
    groups = model.get("num_query_groups") or heads
    _divides(groups, "model.num_query_groups", tp, "parallel.tensor_model_parallel_size")
    _divides(heads, "model.num_attention_heads", groups, "model.num_query_groups")
    hidden = _positive_int(model["hidden_size"], "model.hidden_size")
    _divides(hidden, "model.hidden_size", heads, "model.num_attention_heads")
    layers = _positive_int(model["num_layers"], "model.num_layers")
    _divides(layers, "model.num_layers", pp, "parallel.pipeline_model_parallel_size")
    vpp = parallel.get("virtual_pipeline_model_parallel_size")
    if vpp is not None:
        _positive_int(vpp, "parallel.virtual_pipeline_model_parallel_size")
        if pp < 2:
            raise ConfigError("parallel.virtual_pipeline_model_parallel_size needs "
                              "parallel.pipeline_model_parallel_size >= 2; set it to null")
        _divides(layers // pp, "model.num_layers / pipeline_model_parallel_size", vpp,
                 "parallel.virtual_pipeline_model_parallel_size")
        if model.get("family") != "hunyuan_moe":
            raise ConfigError(f"parallel.virtual_pipeline_model_parallel_size: not supported for "
                              f"model.family={model.get('family')!r}; set it to null")
    if parallel.get("tp_comm_overlap"):   # only a forced overlap can be refused (None / False: nothing to
        from megatron_ext.models import tp_comm_overlap   # check, and no torch import for the planner)

        tp_comm_overlap.wanted(parallel.get("tp_comm_overlap"), tp > 1 and bool(parallel.get("sequence_parallel")))
    cp = parallel.get("context_parallel_size")
    cp = 1 if cp is None else _positive_int(cp, "parallel.context_parallel_size")
    world = nproc * nnodes
    if world % (tp * pp * cp):
        raise ConfigError(
            f"parallel: world size {world} (nproc_per_node x nnodes) is not divisible by "
            f"tensor_model_parallel_size x pipeline_model_parallel_size x context_parallel_size = {tp * pp * cp}; "
            f"make nproc_per_node x nnodes a multiple of {tp * pp * cp}"
        )
    dp = world // (tp * pp * cp)
    if cp > 1:
        _validate_context_parallel(model, tp, cp)
    experts = model.get("num_moe_experts")
    if experts:
        _divides(experts, "model.num_moe_experts", ep, "parallel.expert_model_parallel_size")
        if (dp * cp) % ep:
            raise ConfigError(
                f"parallel.expert_model_parallel_size={ep} must divide data-parallel x context-parallel "
                f"size {dp * cp} (experts are spread over those ranks); choose one of {divisors(dp * cp)}"
            )
        topk = _positive_int(model.get("moe_router_topk", 2), "model.moe_router_topk")
        if topk > experts:
            raise ConfigError(f"model.moe_router_topk={topk} exceeds model.num_moe_experts={experts}")
    elif ep > 1:
        raise ConfigError(
            f"parallel.expert_model_parallel_size={ep} needs an MoE model; this model has no "
            f"num_moe_experts: set parallel.expert_model_parallel_size=1"
        )
    return {"tp": tp, "pp": pp, "ep": ep, "dp": dp, "cp": cp, "world": world}


def _validate_context_parallel(model: Mapping, tp: int, cp: int) -> None:
    """What context parallelism needs of the model: no attention dropout (the ring has no dropout),
    and for Mamba2 megatron-core's all-to-all over heads (heads over TP x CP ranks; groups either
    split over the CP ranks of a TP rank or repeated across them)."""
    if float(model.get("attention_dropout") or 0.0) > 0:
        raise ConfigError(f"model.attention_dropout={model.get('attention_dropout')}: context parallelism has no "
                          f"attention dropout; set it to 0 or parallel.context_parallel_size=1")
    if model.get("family") != "turbos_hybrid":
        return
    heads = _positive_int(model.get("mamba_num_heads"), "model.mamba_num_heads")
    if heads % (tp * cp):
        raise ConfigError(
            f"model.mamba_num_heads={heads} is not divisible by tensor x context parallel = {tp} x {cp}: "
            f"Mamba2's context parallelism gives every rank whole heads; choose context_parallel_size from "
            f"{[d for d in divisors(heads // tp) if d > 1] if heads % tp == 0 else []} or change the heads"
        )
    groups = _positive_int(model.get("mamba_num_groups") or 1, "model.mamba_num_groups")
    local = groups // tp if groups % tp == 0 else 0
    if not local or (local % cp and cp % local):
        raise ConfigError(
            f"model.mamba_num_groups={groups} with tensor_model_parallel_size={tp} and "
            f"context_parallel_size={cp}: each TP rank's groups ({groups}/{tp}) must be divisible by the CP "
            f"size or divide it (megatron-core's MambaContextParallel); change one of them"
        )


def validate_recompute(model: Mapping, prefix: str) -> None:
    """Recomputation a stage's model can build with: full recomputation in CLA models must replay whole
    CLA groups (uniform units of a multiple of cla_share_factor layers), or the build refuses it after
    the job has started (``megatron_ext.models.cla_attention.validate_cla_config``)."""
    share = int(model.get("cla_share_factor") or 1)
    if share == 1 or model.get("recompute_granularity") != "full":
        return
    method, unit = model.get("recompute_method"), model.get("recompute_num_layers")
    if method != "uniform" or not unit or int(unit) % share:
        raise ConfigError(
            f"{prefix}: full recomputation with recompute_method={method!r}, recompute_num_layers={unit} "
            f"and cla_share_factor={share}: each recomputed unit must hold whole CLA groups; use "
            f"recompute_method=uniform with recompute_num_layers a multiple of {share}"
        )


def validate_stage_sequence(model: Mapping, parallel: Mapping, prefix: str) -> None:
    """Context parallelism cuts every sequence into 2 x CP chunks, and sequence parallelism each
    rank's tokens over TP: the stage's sequence length must split evenly."""
    cp = int(parallel.get("context_parallel_size") or 1)
    if cp == 1:
        return
    tp = int(parallel["tensor_model_parallel_size"])
    unit = 2 * cp * (tp if parallel.get("sequence_parallel") and tp > 1 else 1)
    seq = int(model["seq_length"])
    if seq % unit:
        raise ConfigError(
            f"{prefix}.seq_length={seq} is not a multiple of 2 x context_parallel_size"
            f"{' x tensor_model_parallel_size' if unit != 2 * cp else ''} = {unit}: context parallelism "
            f"cuts each sequence into {2 * cp} chunks; use a multiple of {unit} (e.g. {(seq // unit + 1) * unit})"
        )


def validate_model(model: Mapping, parallel: Mapping) -> None:
    """Family-specific structure: CLA groups vs pipeline stages, routing mode vs capacity factor."""
    from types import SimpleNamespace

    family = model.get("family")
    if family not in ("hunyuan_moe", "turbos_hybrid"):
        raise ConfigError(f"model.family={family!r}: choose hunyuan_moe or turbos_hybrid")
    for key, meaning in (("num_query_groups", "as many as attention heads"), ("cla_share_factor", "no CLA"),
                         ("num_moe_experts", "a dense model"), ("moe_ffn_hidden_size", "ffn_hidden_size"),
                         ("moe_shared_expert_intermediate_size", "no shared expert"),
                         ("vocab_size", "the tokenizer's")):
        _optional_positive_int(model, key, meaning)
    if model.get("rotary_base") is not None:
        _number(model["rotary_base"], "model.rotary_base", 0.0, low_open=True)
    for key in ("hidden_dropout", "attention_dropout"):
        if model.get(key) is not None:
            _number(model[key], f"model.{key}", 0.0, 1.0, high_open=True)
    if model.get("moe_expert_capacity_factor") is not None:
        _number(model["moe_expert_capacity_factor"], "model.moe_expert_capacity_factor", 0.0, low_open=True)
    if family == "turbos_hybrid":
        _validate_mamba(model, int(parallel["tensor_model_parallel_size"]))
    share = model.get("cla_share_factor") or 1
    if share > 1:
        from megatron_ext.models.cla_attention import validate_cla_layout

        try:
            validate_cla_layout(int(model["num_layers"]), share, int(parallel["pipeline_model_parallel_size"]),
                                parallel.get("virtual_pipeline_model_parallel_size"))
        except ConfigError as err:
            raise ConfigError(f"model.cla_share_factor / parallel.pipeline_model_parallel_size: {err}") from None
    if model.get("num_moe_experts"):
        from megatron_ext.models.recycle_routing import check_routing_config

        check_routing_config(
            SimpleNamespace(moe_expert_capacity_factor=model.get("moe_expert_capacity_factor"),
                            moe_pad_expert_input_to_capacity=model.get("moe_pad_expert_input_to_capacity", False)),
            model.get("moe_routing_mode") or "dropless",
        )


def _validate_mamba(model: Mapping, tp: int) -> None:
    """The hybrid's block layout against num_layers, and megatron-core MambaMixer's shape rules."""
    from megatron_ext.models.turbos_layout import layer_pattern

    layer_pattern(model)
    for key in ("mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim", "mamba_chunk_size"):
        if model.get(key) is not None:
            _positive_int(model[key], f"model.{key}")
    heads, groups = model.get("mamba_num_heads"), model.get("mamba_num_groups")
    if heads is not None and groups is not None:
        _divides(heads, "model.mamba_num_heads", groups, "model.mamba_num_groups")
        _divides(heads, "model.mamba_num_heads", tp, "parallel.tensor_model_parallel_size")
        _divides(groups, "model.mamba_num_groups", tp, "parallel.tensor_model_parallel_size")


def validate_train(train: Mapping, prefix: str, dp: int, pp: int = 1, vpp: int | None = None) -> None:
    steps = _positive_int(train["steps"], f"{prefix}.steps")
    gbs = _positive_int(train["global_batch_size"], f"{prefix}.global_batch_size")
    mbs = _positive_int(micro_batch_size(train, dp, pp, prefix), f"{prefix}.micro_batch_size")
    if gbs % (mbs * dp):
        raise ConfigError(
            f"{prefix}.global_batch_size={gbs} must be a multiple of micro_batch_size x data-parallel "
            f"size = {mbs} x {dp}; e.g. set it to {mbs * dp * max(1, gbs // (mbs * dp))}"
        )
    if vpp and gbs // (mbs * dp) < pp:
        raise ConfigError(
            f"{prefix}: the interleaved pipeline schedule needs at least pipeline_model_parallel_size={pp} "
            f"micro-batches per step; global_batch_size / (micro_batch_size x data-parallel) = "
            f"{gbs // (mbs * dp)}: raise global_batch_size"
        )
    style = train["lr_decay_style"]
    if style not in LR_DECAY_STYLES:
        raise ConfigError(f"{prefix}.lr_decay_style={style!r}: choose one of {list(LR_DECAY_STYLES)}")
    warmup = train["warmup_steps"]
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup < steps:
        # megatron-core's OptimizerParamScheduler asserts lr_warmup_steps < lr_decay_steps (= steps)
        raise ConfigError(f"{prefix}.warmup_steps={warmup!r}: must be an integer in [0, steps - 1 = {steps - 1}] "
                          f"(the schedule needs a step after the warm-up); lower it or raise {prefix}.steps")
    if style == "WSD":
        decay = train.get("wsd_decay_steps")
        if not isinstance(decay, int) or not 0 < decay <= steps - warmup:
            raise ConfigError(
                f"{prefix}.wsd_decay_steps={decay!r}: WSD needs the length of its final decay phase, "
                f"an integer in [1, steps - warmup_steps = {steps - warmup}]"
            )
    if not float(train["min_lr"]) <= float(train["lr"]):
        raise ConfigError(f"{prefix}.min_lr={train['min_lr']} must not exceed {prefix}.lr={train['lr']}")
    # megatron-core's OptimizerParamScheduler asserts init_lr <= max_lr; torch's Adam refuses betas >= 1
    _number(train.get("init_lr", 0.0), f"{prefix}.init_lr", 0.0, float(train["lr"]))
    for key in ("adam_beta1", "adam_beta2"):
        _number(train[key], f"{prefix}.{key}", 0.0, 1.0, high_open=True)
    _positive_int(train.get("log_interval", 1), f"{prefix}.log_interval")
    for key in ("eval_interval", "save_interval"):   # 0: only at the end
        _non_negative_int(train.get(key, 0), f"{prefix}.{key}")


def validate_data(data: Mapping) -> None:
    tokenizer_path = (data.get("tokenizer") or {}).get("path")
    if tokenizer_path and not os.path.isdir(tokenizer_path):
        raise ConfigError(
            f"data.tokenizer.path={tokenizer_path!r} does not exist; point it at a local tokenizer "
            f"folder (with tokenizer.json) or set it to null to train one on the sources"
        )
    sources = data.get("sources") or {}
    if not sources:
        raise ConfigError("data.sources is empty: add at least one generator or file source")
    for name, src in sources.items():
        path = src.get("path")
        if path is not None and not os.path.exists(path):
            raise ConfigError(
                f"data.sources.{name}.path={path!r} does not exist; fix the path or remove the source"
            )
        if path is None and not src.get("generator"):
            raise ConfigError(f"data.sources.{name}: give either path (a local file) or generator")


def validate_sft_tasks(tasks: Mapping | None, prefix: str) -> None:
    """The ``tasks:`` section an SFT stage builds its data from (data_pipelines.verifiable_tasks)."""
    from data_pipelines.chat_format import THINKING_TOKENS
    from data_pipelines.verifiable_tasks import DIFFICULTIES, KINDS

    if not tasks:
        raise ConfigError(f"{prefix} is missing: an sft stage needs kinds, num_tasks, difficulties, "
                          f"held_out_fraction and thinking (see launch/conf/stage/sft.yaml)")
    kinds = list(tasks.get("kinds") or [])
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise ConfigError(f"{prefix}.kinds={kinds!r}: choose a non-empty list from {sorted(KINDS)}")
    _positive_int(tasks.get("num_tasks"), f"{prefix}.num_tasks")
    levels = list(tasks.get("difficulties") or [])
    if not levels or any(d not in DIFFICULTIES for d in levels):
        raise ConfigError(f"{prefix}.difficulties={levels!r}: choose a non-empty subset of {list(DIFFICULTIES)}")
    fraction = tasks.get("held_out_fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(f"{prefix}.held_out_fraction={fraction!r}: must be in (0, 1) (the held-out "
                          f"conversations give the evaluation loss)")
    thinking = tasks.get("thinking")
    if thinking is not None and thinking not in THINKING_TOKENS:
        raise ConfigError(f"{prefix}.thinking={thinking!r}: choose null or one of {sorted(THINKING_TOKENS)}")


def _fraction(value: Any, field: str, low_open: bool = True) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (0 < value if low_open else 0 <= value) \
        and value <= 1
    if not ok:
        raise ConfigError(f"{field}={value!r}: must be in {'(0' if low_open else '[0'}, 1]")
    return float(value)


def validate_sampling_stage(name: str, st: Mapping, order: list[str]) -> None:
    """The stages that sample from their parent (cot_fusion, deliberation): prompts, sampling, refs."""
    prefix = f"stages.{name}"
    if order.index(name) == 0 and not st.get("init_from"):
        raise ConfigError(f"{prefix}: a {st['kind']} stage samples from a trained model; put a stage "
                          f"before it in pipeline.order or set {prefix}.init_from to a checkpoint")
    prompts = st.get("prompts") or {}
    validate_sft_tasks({**prompts, "held_out_fraction": 0.5, "thinking": None}, f"{prefix}.prompts")
    sampling = st.get("sampling") or {}
    temperature = sampling.get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ConfigError(f"{prefix}.sampling.temperature={temperature!r}: must be >= 0 (0 is greedy)")
    _fraction(sampling.get("top_p", 1.0), f"{prefix}.sampling.top_p")
    _positive_int(sampling.get("max_new_tokens"), f"{prefix}.sampling.max_new_tokens")
    _positive_int(sampling.get("batch_size"), f"{prefix}.sampling.batch_size")
    if st["kind"] == "cot_fusion":
        fusion = st.get("fusion") or {}
        _positive_int(fusion.get("k_short"), f"{prefix}.fusion.k_short")
        _positive_int(fusion.get("max_long_attempts"), f"{prefix}.fusion.max_long_attempts")
        _fraction(fusion.get("easy_threshold"), f"{prefix}.fusion.easy_threshold")
        if fusion.get("hard_fallback") not in ("drop", "short"):
            raise ConfigError(f"{prefix}.fusion.hard_fallback={fusion.get('hard_fallback')!r}: choose drop or short")
        long_model = fusion.get("long_model")
        if long_model and not os.path.isdir(long_model):
            raise ConfigError(f"{prefix}.fusion.long_model={long_model!r}: checkpoint folder not found")
    if st["kind"] == "deliberation":
        refs = list(st.get("references") or [])
        if not refs:
            raise ConfigError(f"{prefix}.references is empty: name earlier stages or checkpoint folders to battle")
        earlier = order[:order.index(name)]
        for ref in refs:
            if ref not in earlier and not os.path.isdir(ref):
                raise ConfigError(f"{prefix}.references: {ref!r} is neither an earlier stage of pipeline.order "
                                  f"{earlier} nor a checkpoint folder")
        _positive_int(st.get("budget"), f"{prefix}.budget")
        _fraction(st.get("weak_share"), f"{prefix}.weak_share", low_open=False)


def validate_rl_stage(name: str, st: Mapping, order: list[str]) -> None:
    """An RL stage's rollout shape, prompt sources and LaSeR settings (posttrain/rl_stage.py)."""
    prefix = f"stages.{name}"
    if order.index(name) == 0 and not st.get("init_from"):
        raise ConfigError(f"{prefix}: RL starts from a trained policy; put a stage before it in "
                          f"pipeline.order or set {prefix}.init_from to a checkpoint")
    rl, train = st.get("rl") or {}, st["train"]
    groups = _positive_int(rl.get("groups"), f"{prefix}.rl.groups")
    size = _positive_int(rl.get("group_size"), f"{prefix}.rl.group_size")
    if size < 2:
        raise ConfigError(f"{prefix}.rl.group_size={size}: GRPO compares answers within a group; use >= 2")
    epochs = _positive_int(rl.get("epochs"), f"{prefix}.rl.epochs")
    _positive_int(rl.get("max_sampling_rounds"), f"{prefix}.rl.max_sampling_rounds")
    gbs = int(train["global_batch_size"])
    if (groups * size) % gbs:
        raise ConfigError(f"{prefix}: rl.groups x rl.group_size = {groups * size} sequences per rollout must be "
                          f"a multiple of train.global_batch_size={gbs} (one update per mini-batch)")
    per_rollout = groups * size // gbs * epochs
    save = int(train.get("save_interval") or 0)
    if save and save % per_rollout:
        raise ConfigError(f"{prefix}.train.save_interval={save}: make it a multiple of the {per_rollout} updates "
                          f"per rollout, so a resume starts at a fresh rollout")
    kl = rl.get("kl_coef")
    if isinstance(kl, bool) or not isinstance(kl, (int, float)) or kl < 0:
        raise ConfigError(f"{prefix}.rl.kl_coef={kl!r}: must be >= 0 (0: no reference model)")
    sources = (st.get("prompts") or {}).get("sources") or {}
    known = ("synthetic", "code", "instruction", "math_file", "code_file")
    unknown = sorted(set(sources) - set(known))
    if unknown or not any(float(v.get("weight", 0)) > 0 for v in sources.values()):
        raise ConfigError(f"{prefix}.prompts.sources: give sources from {list(known)} with a weight > 0"
                          + (f" (unknown: {unknown})" if unknown else ""))
    for name in ("math_file", "code_file"):
        src = sources.get(name)
        if src and float(src.get("weight", 0)) > 0 and not os.path.isfile(str(src.get("path"))):
            raise ConfigError(f"{prefix}.prompts.sources.{name}.path={src.get('path')!r}: no such file; point it "
                              f"at a local JSON-lines file")
    temperature = (st.get("sampling") or {}).get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ConfigError(f"{prefix}.sampling.temperature={temperature!r}: RL samples from the policy; use > 0")
    _validate_laser(prefix, st.get("laser") or {}, int(train["steps"]))


def _validate_laser(prefix: str, ls: Mapping, steps: int) -> None:
    """LaSeR's block: a self-reward whose loss or advantage warm-up outlasts the stage would be
    configured and never used, so it is refused (LaSeR: 200 + 200 updates of a longer run)."""
    if not ls.get("enabled"):
        return
    for key in ("alpha", "beta", "adv_coef", "std_threshold"):
        value = ls.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{prefix}.laser.{key}={value!r}: must be a number >= 0")
    if not ls["beta"] > 0:
        raise ConfigError(f"{prefix}.laser.beta=0: the score beta * (log p - c_ref) would be 0; LaSeR uses 0.1")
    if ls["adv_coef"] > 1:
        raise ConfigError(f"{prefix}.laser.adv_coef={ls['adv_coef']}: a weight in [0, 1] (LaSeR: 0.1)")
    loss_w = _non_negative_int(ls.get("loss_warmup_steps"), f"{prefix}.laser.loss_warmup_steps")
    adv_w = _non_negative_int(ls.get("adv_warmup_steps"), f"{prefix}.laser.adv_warmup_steps")
    if loss_w >= steps:
        raise ConfigError(f"{prefix}.laser.loss_warmup_steps={loss_w} >= train.steps={steps}: the self-reward loss "
                          f"would never start; lower it or raise train.steps (or set laser.enabled=false)")
    if ls["adv_coef"] > 0 and loss_w + adv_w >= steps:
        raise ConfigError(f"{prefix}.laser: loss_warmup_steps + adv_warmup_steps = {loss_w} + {adv_w} >= "
                          f"train.steps={steps}: the self-reward would never enter the advantages; lower the "
                          f"warm-ups, raise train.steps, or set laser.adv_coef=0")


def validate_evaluate_stage(name: str, st: Mapping, order: list[str]) -> None:
    from data_pipelines.eval_sets import EVAL_SETS

    prefix = f"stages.{name}"
    if order.index(name) == 0 and not st.get("init_from"):
        raise ConfigError(f"{prefix}: nothing to evaluate; put a stage before it in pipeline.order or set "
                          f"{prefix}.init_from to a checkpoint")
    _positive_int(st.get("k"), f"{prefix}.k")
    _positive_int(st.get("max_problems"), f"{prefix}.max_problems")
    unknown = [s for s in st.get("sets") or [] if s not in EVAL_SETS]
    if unknown:
        raise ConfigError(f"{prefix}.sets: unknown {unknown}; choose from {list(EVAL_SETS)}")


_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{2}){0,2}$")   # [days-]hours[:minutes[:seconds]] or minutes


def _slurm_seconds(value: str) -> int:
    days, _, clock = value.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if not days and len(parts) == 1:      # a bare number is minutes
        return parts[0] * 60
    h, m, sec = (parts + [0, 0])[:3]
    return int(days or 0) * 86400 + h * 3600 + m * 60 + sec


def validate_cluster(cluster: Mapping, parallel: Mapping) -> None:
    """The launcher's settings: known launcher, and for SLURM jobs that can hold the stage's ranks and
    leave time to save after the preemption warning."""
    name = cluster.get("name")
    if name not in ("local", "slurm", "nemo_run"):
        raise ConfigError(f"cluster.name={name!r} is not a launcher; choose a preset: cluster=local, "
                          f"cluster=slurm, cluster=slurm_cpu, cluster=nemo_local or cluster=nemo_slurm")
    if name == "nemo_run" and cluster.get("executor") not in ("local", "slurm"):
        raise ConfigError(f"cluster.executor={cluster.get('executor')!r}: nemo-run executors are local and "
                          f"slurm (cluster=nemo_local, cluster=nemo_slurm)")
    if name == "local" or (name == "nemo_run" and cluster["executor"] == "local"):
        return
    for field in ("time", "data_job.time"):
        value = str(cluster["data_job"]["time"] if field == "data_job.time" else cluster["time"])
        if not _SLURM_TIME.match(value):
            raise ConfigError(f"cluster.{field}={value!r}: not a SLURM time; write e.g. \"04:00:00\" "
                              f"or \"1-00:00:00\"")
    warning = _positive_int(cluster["preempt_warning_s"], "cluster.preempt_warning_s")
    if warning >= _slurm_seconds(str(cluster["time"])):
        raise ConfigError(f"cluster.preempt_warning_s={warning} is not shorter than cluster.time="
                          f"{cluster['time']!r}: the job would be warned before it starts working")
    if int(cluster["shutdown_timeout_s"]) >= warning:
        raise ConfigError(f"cluster.shutdown_timeout_s={cluster['shutdown_timeout_s']} must be shorter than "
                          f"cluster.preempt_warning_s={warning}, or the time limit kills ranks mid-save")
    gpus = cluster.get("gpus_per_node") or 0
    if gpus and gpus != parallel["nproc_per_node"]:
        raise ConfigError(f"cluster.gpus_per_node={gpus} but parallel.nproc_per_node="
                          f"{parallel['nproc_per_node']}: one rank per GPU; make them equal (or 0 for CPU)")
    _positive_int(cluster["cpus_per_task"], "cluster.cpus_per_task")


def validate(cfg: Mapping) -> dict[str, int]:
    """Raise :class:`ConfigError` on the first problem; return the derived parallel sizes."""
    sizes = validate_parallel(cfg["model"], cfg["parallel"])
    validate_cluster(cfg["cluster"], cfg["parallel"])
    validate_model(cfg["model"], cfg["parallel"])
    _positive_int(cfg["model"]["seq_length"], "model.seq_length")
    validate_data(cfg["data"])
    order = list(cfg["pipeline"]["order"])
    if not order:
        raise ConfigError("pipeline.order is empty: list the stages to run")
    stages = cfg.get("stages") or {}
    for name in order:
        if name not in stages:
            raise ConfigError(
                f"pipeline.order names unknown stage {name!r}; configured stages: {sorted(stages)} "
                f"(add one with +stages.{name}=... or a pipeline preset)"
            )
    if len(set(order)) != len(order):
        raise ConfigError(f"pipeline.order={order} lists a stage twice; give each run its own name")
    mixes = cfg["data"].get("mixes") or {}
    for name in order:
        st = stages[name]
        kind = st.get("kind")
        if kind not in STAGE_KINDS:
            raise ConfigError(f"stages.{name}.kind={kind!r} is not a known stage; choose one of {sorted(STAGE_KINDS)}")
        if kind == "pretrain" and st.get("mix") not in mixes:
            raise ConfigError(f"stages.{name}.mix={st.get('mix')!r} is not one of data.mixes {sorted(mixes)}")
        if kind == "sft":
            validate_sft_tasks(st.get("tasks"), f"stages.{name}.tasks")
        if kind in ("cot_fusion", "deliberation"):
            validate_sampling_stage(name, st, order)
        if kind == "rl":
            validate_rl_stage(name, st, order)
        parent = st.get("parent")
        if parent is not None and (parent not in order or order.index(parent) >= order.index(name)):
            raise ConfigError(f"stages.{name}.parent={parent!r}: name a stage before {name!r} in pipeline.order "
                              f"{order} (or leave it null: the previous stage)")
        if parent is not None and st.get("init_from"):
            raise ConfigError(f"stages.{name}: set parent or init_from, not both (init_from={st.get('init_from')!r}, "
                              f"parent={parent!r})")
        init_from = st.get("init_from")
        if init_from and not os.path.isdir(init_from):
            raise ConfigError(
                f"stages.{name}.init_from={init_from!r}: parent checkpoint not found; point it at a "
                f"checkpoint folder (e.g. <run_dir>/01_pretrain/checkpoints/iter_0000300) or set null"
            )
        if kind == "evaluate":
            validate_evaluate_stage(name, st, order)
            continue  # trains nothing: no train section
        parallel = stage_parallel_config(cfg, name)
        model = stage_model_config(cfg, name)
        stage_sizes = validate_parallel(model, parallel)   # the stage's model and layout (CP or not)
        validate_train(st["train"], f"stages.{name}.train", stage_sizes["dp"], stage_sizes["pp"],
                       cfg["parallel"].get("virtual_pipeline_model_parallel_size"))
        seq = _positive_int(model["seq_length"], f"stages.{name}.model_overrides.seq_length")
        validate_stage_sequence(model, parallel, f"stages.{name}.model_overrides")
        validate_recompute(model, f"stages.{name} (model + model_overrides)")
        batch_tokens = int(st["train"]["global_batch_size"]) * seq
        expert_lr_scale(st["train"].get("expert_lr"), model, batch_tokens, field=f"stages.{name}.train.expert_lr")
    return sizes
