"""The plan as a human reads it: the model, the pick and why, the pick's memory per GPU, and
every layout in a table (infeasible ones with the reason)."""

from __future__ import annotations

from shardserve.planner.layouts import LayoutPlan
from shardserve.planner.memory import GiB
from shardserve.planner.plan import Plan
from shardserve.planner.weights import kv_bytes_per_token_layer, total_params


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _tokens(n: int) -> str:
    return f"{n:,}"


def format_plan(plan: Plan) -> str:
    shape, limits, pool = plan.shape, plan.limits, plan.pool
    kv_token = shape.num_layers * kv_bytes_per_token_layer(shape, 1, limits.kv_elem_bytes)
    extras = [x for x, on in (("MoE", shape.moe), ("MLA", shape.mla)) if on]
    lines = [
        f"Model    {shape.name} ({shape.architecture}{', ' + ' + '.join(extras) if extras else ''}"
        f"): {total_params(shape) / 1e9:.2f} B parameters, {shape.num_layers} layers, "
        f"{shape.num_heads} heads / {shape.num_kv_heads} KV heads, {plan.dtype}",
        f"         KV cache {kv_token / 1024:.1f} KiB per token (all layers, TP 1)",
        f"GPUs     {pool.num_gpus} × {pool.gpu_memory_bytes / GiB:.1f} GiB, {pool.gpus_per_node} per "
        f"node ({pool.num_nodes} node{'s' if pool.num_nodes > 1 else ''}); "
        f"gpu_memory_utilization {limits.gpu_memory_utilization:.2f} -> "
        f"{pool.gpu_memory_bytes * limits.gpu_memory_utilization / GiB:.1f} GiB usable per GPU",
        f"Serving  max_model_len {limits.max_model_len}, max_num_seqs {limits.max_num_seqs}, "
        f"max_num_batched_tokens {limits.max_num_batched_tokens}, block_size {limits.block_size}"
        + (", expert parallel" if limits.expert_parallel else ""),
    ]
    lines += [f"Warning  {w}" for w in plan.warnings]
    if not shape.served:
        lines.append(f"Note     the engine does not serve {shape.architecture} yet; the "
                     "numbers follow vLLM's layout for it")
    best = plan.best
    lines.append("")
    if best is None:
        lines.append("Pick     none. " + plan.reason)
    else:
        lines.append(f"Pick     {best.name}  ({best.gpus_per_group} GPU"
                     f"{'s' if best.gpus_per_group > 1 else ''} per replica)")
        lines.append(f"Why      {plan.reason}")
        lines.append("")
        lines += _memory_table(best, limits.max_model_len)
    lines.append("")
    lines += _layouts_table(plan.layouts, limits.max_model_len)
    return "\n".join(lines)


def _memory_table(p: LayoutPlan, max_model_len: int) -> list[str]:
    head = ["Per GPU (GiB)".ljust(28)] + [
        (f"stage {s.stage} [{s.start_layer}:{s.end_layer})" if p.pp > 1 else "every GPU").rjust(16)
        for s in p.stages]
    rows = [("weights (+ RoPE table)", lambda s: _gib(s.weights_bytes)),
            ("activations (profile peak)", lambda s: _gib(s.activation_bytes)),
            ("framework overhead", lambda s: _gib(s.overhead_bytes)),
            ("KV cache", lambda s: _gib(s.kv_cache_bytes)),
            ("= under utilization", lambda s: _gib(s.weights_bytes + s.activation_bytes
                                                   + s.overhead_bytes + s.kv_cache_bytes)),
            ("CUDA graphs (headroom)", lambda s: _gib(s.cuda_graph_bytes)),
            ("total used", lambda s: _gib(s.total_bytes)),
            ("GPU memory", lambda s: _gib(s.gpu_memory_bytes))]
    out = ["".join(head)]
    for label, cell in rows:
        out.append(label.ljust(28) + "".join(cell(s).rjust(16) for s in p.stages))
    out.append(f"KV cache per replica: {p.num_blocks:,} blocks = {_tokens(p.kv_tokens)} tokens = "
               f"{p.max_seqs_at_max_len} sequences of {max_model_len} at once "
               f"({p.total_seqs} across {p.dp} replica{'s' if p.dp > 1 else ''})")
    out += [f"Note: {n}" for n in p.notes]
    return out


def _layouts_table(layouts: list[LayoutPlan], max_model_len: int) -> list[str]:
    cols = ["#", "TP", "PP", "DP", "nodes/grp", "weights/GPU", "KV/GPU", "KV tokens/repl",
            f"seqs@{max_model_len}/repl", "total seqs", "status"]
    widths = [3, 4, 4, 4, 10, 12, 9, 15, max(14, len(cols[8]) + 1), 11, 0]
    out = ["Layouts", "".join(c.rjust(w) if w else "  " + c for c, w in zip(cols, widths))]
    for p in layouts:
        heaviest = max(p.stages, key=lambda s: s.weights_bytes) if p.stages else None
        cells = [str(p.rank) if p.feasible else "-", str(p.tp), str(p.pp), str(p.dp),
                 str(p.nodes_per_group),
                 _gib(heaviest.weights_bytes) if heaviest else "",
                 _gib(min(s.kv_cache_bytes for s in p.stages)) if p.stages else "",
                 _tokens(p.kv_tokens) if p.stages else "",
                 str(p.max_seqs_at_max_len) if p.stages else "",
                 str(p.total_seqs) if p.stages else ""]
        status = "ok" if p.feasible else "no: " + "; ".join(p.problems)
        if p.feasible and not p.meets_target:
            status = "ok, below target concurrency"
        if p.feasible and p.notes:
            status += " (" + "; ".join(p.notes) + ")"
        out.append("".join(c.rjust(w) for c, w in zip(cells, widths)) + "  " + status)
    return out
