"""Every (TP, PP, DP) layout of a GPU pool, evaluated and ranked, with the reason for the pick.

Rules (the usual practice of vLLM/SGLang deployments, and what the engine can run):
- TP must suit the model: attention heads divide by TP; KV heads divide by TP, or TP is a
  multiple of them (each KV head then replicated). TP stays within a node: its all-reduce runs
  twice per layer and wants NVLink.
- PP goes across nodes: one send of the hidden states per stage boundary per step.
- A model-parallel group either fits in one node (and the node's GPUs divide into whole groups)
  or takes whole nodes, each node holding whole TP groups.
- DP uses every GPU left: replicas multiply throughput and each has its own KV cache.

Pick: among layouts that fit, the first by (meets --target-concurrency (if none does: most
sequences first), KV cache at least MIN_KV_FRACTION of usable memory, group within one node,
fewest GPUs per group, fewest stages, most sequences in flight): the smallest group that leaves
the KV cache room to work, and so the most replicas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardserve.planner.memory import GiB, ServingLimits, StageMemory, settle_blocks, stage_memory
from shardserve.planner.shape import ModelShape
from shardserve.planner.stages import pipeline_stage_layers
from shardserve.planner.weights import tp_problems

# Below this share of usable memory the KV cache holds too few sequences to batch well.
MIN_KV_FRACTION = 0.2


@dataclass(frozen=True)
class GpuPool:
    """The hardware: `num_gpus` GPUs of `gpu_memory_bytes`, `gpus_per_node` to a node."""

    num_gpus: int
    gpu_memory_bytes: int
    gpus_per_node: int

    @property
    def num_nodes(self) -> int:
        return -(-self.num_gpus // self.gpus_per_node)


@dataclass
class LayoutPlan:
    """One (TP, PP, DP) layout: its per-GPU memory by stage, its capacity, and its verdict."""

    tp: int
    pp: int
    dp: int
    nodes_per_group: int  # 1 for a group inside one node
    stages: list[StageMemory] = field(default_factory=list)
    num_blocks: int = 0  # per replica (the same on every stage)
    kv_tokens: int = 0  # per replica
    max_seqs_at_max_len: int = 0  # per replica: sequences of max_model_len that fit at once
    problems: list[str] = field(default_factory=list)  # why it cannot run; empty: it can
    notes: list[str] = field(default_factory=list)
    meets_target: bool = True
    rank: int = 0  # 1 = the pick, among feasible layouts; 0 for infeasible ones

    @property
    def feasible(self) -> bool:
        return not self.problems

    @property
    def gpus_per_group(self) -> int:
        return self.tp * self.pp

    @property
    def spans_nodes(self) -> bool:
        return self.nodes_per_group > 1

    @property
    def total_seqs(self) -> int:
        return self.dp * self.max_seqs_at_max_len

    @property
    def kv_fraction(self) -> float:
        if not self.stages:
            return 0.0
        return min(s.kv_cache_bytes / s.usable_bytes for s in self.stages)

    @property
    def name(self) -> str:
        return f"TP {self.tp} × PP {self.pp} × DP {self.dp}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(pool: GpuPool) -> list[tuple[int, int, int, int]]:
    """(tp, pp, dp, nodes_per_group) for every TP and PP dividing the GPU count."""
    out = []
    for tp in _divisors(pool.num_gpus):
        for pp in _divisors(pool.num_gpus // tp):
            group = tp * pp
            nodes = -(-group // pool.gpus_per_node)
            out.append((tp, pp, pool.num_gpus // group, nodes))
    return out


def placement_problems(tp: int, pp: int, pool: GpuPool) -> list[str]:
    g, group = pool.gpus_per_node, tp * pp
    if tp > g:
        return [f"TP {tp} is more than the {g} GPUs of a node: tensor parallelism stays within "
                "a node (use PP across nodes)"]
    if group <= g:
        if pool.num_gpus > g and g % group:
            return [f"groups of {group} GPUs do not tile nodes of {g}"]
        return []
    if group % g or g % tp:
        return [f"a group of {group} GPUs spanning nodes must take whole nodes of {g} GPUs, "
                f"each holding whole TP groups"]
    return []


def evaluate_layout(shape: ModelShape, tp: int, pp: int, dp: int, nodes_per_group: int,
                    pool: GpuPool, limits: ServingLimits) -> LayoutPlan:
    plan = LayoutPlan(tp, pp, dp, nodes_per_group)
    plan.problems += (tp_problems(shape, tp, limits.expert_parallel)
                      + placement_problems(tp, pp, pool))
    if pp > shape.num_layers:
        plan.problems.append(f"PP {pp} is more than the model's {shape.num_layers} layers")
    if plan.problems:
        return plan
    bounds = pipeline_stage_layers(shape, pp)
    plan.stages = [stage_memory(shape, tp, pp, i, start, end, limits, pool.gpu_memory_bytes)
                   for i, (start, end) in enumerate(bounds)]
    plan.num_blocks = settle_blocks(plan.stages)
    plan.kv_tokens = plan.num_blocks * limits.block_size
    blocks_per_seq = -(-limits.max_model_len // limits.block_size)
    plan.max_seqs_at_max_len = min(plan.num_blocks // blocks_per_seq, limits.max_num_seqs)
    if plan.num_blocks < blocks_per_seq:
        plan.problems.append(_oom_diagnosis(plan, limits, blocks_per_seq))
    headroom_short = [s for s in plan.stages if s.headroom_bytes < 0]
    if headroom_short and plan.feasible:
        worst = min(s.headroom_bytes for s in headroom_short)
        plan.notes.append(f"CUDA graphs need {-worst / GiB:.2f} GiB more than the "
                          f"{1 - limits.gpu_memory_utilization:.0%} headroom: lower "
                          "--gpu-memory-utilization or use --enforce-eager")
    return plan


def _oom_diagnosis(plan: LayoutPlan, limits: ServingLimits, blocks_per_seq: int) -> str:
    worst = min(plan.stages, key=lambda s: s.kv_budget_bytes / s.kv_bytes_per_block)
    usable = worst.usable_bytes / GiB
    fixed = (worst.weights_bytes + worst.activation_bytes + worst.overhead_bytes) / GiB
    one_seq = blocks_per_seq * worst.kv_bytes_per_block
    missing = (one_seq - worst.kv_budget_bytes) / GiB
    where = f"stage {worst.stage}'s GPUs" if plan.pp > 1 else "each GPU"
    if worst.kv_budget_bytes <= 0:
        head = (f"out of memory: weights {worst.weights_bytes / GiB:.2f} + activations "
                f"{worst.activation_bytes / GiB:.2f} + overhead {worst.overhead_bytes / GiB:.2f} "
                f"= {fixed:.2f} GiB > {usable:.2f} GiB usable on {where}")
    else:
        fit = worst.kv_budget_bytes // worst.kv_bytes_per_block * limits.block_size
        head = (f"KV cache too small: {fit} tokens fit on {where}, one sequence of "
                f"max_model_len {limits.max_model_len} needs {blocks_per_seq * limits.block_size}")
    return f"{head}; {missing:.2f} GiB missing per GPU"


def rank_layouts(plans: list[LayoutPlan], target_concurrency: int | None) -> list[LayoutPlan]:
    """Order: feasible ones by the pick's rule (module docstring), then the infeasible."""
    for plan in plans:
        plan.meets_target = target_concurrency is None or plan.total_seqs >= target_concurrency

    def key(p: LayoutPlan) -> tuple:
        # Short of the target, holding more sequences comes first.
        return (not p.meets_target, 0 if p.meets_target else -p.total_seqs,
                p.kv_fraction < MIN_KV_FRACTION, p.spans_nodes, p.gpus_per_group, p.pp,
                -p.total_seqs)

    feasible = sorted((p for p in plans if p.feasible), key=key)
    for i, plan in enumerate(feasible, start=1):
        plan.rank = i
    infeasible = sorted((p for p in plans if not p.feasible), key=lambda p: (p.gpus_per_group, p.pp))
    return feasible + infeasible


def pick_reason(ranked: list[LayoutPlan], target_concurrency: int | None) -> str:
    """Why the first feasible layout won, in a sentence or two."""
    feasible = [p for p in ranked if p.feasible]
    if not feasible:
        return "No layout fits: see each layout's problem."
    pick = feasible[0]
    smaller = [p for p in ranked if p.gpus_per_group < pick.gpus_per_group]
    no_fit = [p for p in smaller if not p.feasible]
    low_kv = [p for p in smaller if p.feasible and p.kv_fraction < MIN_KV_FRACTION]
    parts = []
    if pick.gpus_per_group == 1:
        parts.append("the model fits one GPU with room for its KV cache")
    if no_fit:
        closest = max(no_fit, key=lambda p: p.gpus_per_group)
        parts.append(f"smaller groups do not fit ({closest.name}: {closest.problems[0]})")
    if low_kv:
        p = max(low_kv, key=lambda p: p.kv_fraction)
        parts.append(f"{p.name} fits but leaves only {p.kv_fraction:.0%} of memory to the KV "
                     f"cache (under {MIN_KV_FRACTION:.0%})")
    if target_concurrency is not None and any(p.feasible and not p.meets_target for p in smaller):
        parts.append(f"smaller groups hold fewer than {target_concurrency} sequences in total")
    if pick.pp > 1 and pick.spans_nodes:
        parts.append(f"TP {pick.tp} within each node, PP {pick.pp} across "
                     f"{pick.nodes_per_group} nodes")
    elif pick.tp > 1:
        parts.append(f"TP {pick.tp} within one node")
    if pick.dp > 1:
        parts.append(f"DP {pick.dp} replicas on the remaining GPUs for throughput")
    if not pick.meets_target:
        parts.append(f"no layout reaches {target_concurrency} sequences; this one holds the most "
                     "that fits")
    text = "; ".join(parts)
    return text[:1].upper() + text[1:] + "."


def plan_layouts(shape: ModelShape, pool: GpuPool, limits: ServingLimits,
                 target_concurrency: int | None = None,
                 fixed: dict[str, int] | None = None) -> list[LayoutPlan]:
    """Evaluate and rank every layout; `fixed` pins some of tp/pp/dp (from the user)."""
    fixed = fixed or {}
    plans = []
    for tp, pp, dp, nodes in candidate_layouts(pool):
        if any(fixed.get(k) not in (None, v) for k, v in (("tp", tp), ("pp", pp))):
            continue
        if fixed.get("dp") is not None:
            if fixed["dp"] > dp:
                continue
            dp = fixed["dp"]
        plans.append(evaluate_layout(shape, tp, pp, dp, nodes, pool, limits))
    return rank_layouts(plans, target_concurrency)
