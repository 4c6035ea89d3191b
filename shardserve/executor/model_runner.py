"""ModelRunner: SchedulerOutput -> tensors -> model -> sampler -> ModelRunnerOutput.

It owns the model, the KV cache tensors and the worker's per-request state. The scheduler
sends diffs; the runner keeps whatever it needs to rebuild each step's inputs.

Under tensor parallelism every rank runs the same steps (the collectives need them all), but
only the driver (TP rank 0 of the last PP stage, `is_driver`) receives the gathered logits,
samples and builds a ModelRunnerOutput; the others return an empty one. Per-request seeded
generators therefore advance on one rank only, and seeded sampling is reproducible at any tp.
Rows without a seed draw from the runner's own generator, seeded with the engine's seed, so
an in-process engine's samples do not depend on its caller's (or another engine's) draws
from torch's default generator.

Under pipeline parallelism each stage holds its own layers (models/pipeline.py) and KV cache.
Every rank gets every step and builds the same inputs from it (so the token count, positions
and attention metadata need no hand-shake between stages); a non-first stage receives the
previous stage's hidden states and residual, [2, T, hidden], from its peer in the PP group (the
same TP rank one stage up), and a non-last stage sends its own on and returns at once, free to
run the next micro-batch while later stages work on this one.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from shardserve.config import EngineConfig
from shardserve.distributed.parallel_state import get_pp_group, get_tp_group
from shardserve.engine.outputs import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from shardserve.errors import CacheTooSmallError
from shardserve.executor import gpu_memory
from shardserve.executor.kernel_warmup import warm_up_step_kernels
from shardserve.executor.input_builder import ModelInputs, build_model_inputs, upload
from shardserve.executor.pipeline_stats import StageTimer
from shardserve.executor.request_state import RequestStates
from shardserve.executor.sampling_batch import SamplingBatch
from shardserve.forward_context import set_forward_context
from shardserve.layers.attention import Attention, AttentionLayerBase, select_attention_backend
from shardserve.layers.sampler import (Sampler, SamplerOutput, compute_prompt_logprobs,
                                       sample_vocab_shards)
from shardserve.models.pipeline import IntermediateTensors, StageLayout

logger = logging.getLogger(__name__)

_CPU_DEFAULT_KV_BYTES = 1 << 30


def max_mixed_graph_tokens(config: EngineConfig, backend, attn_layers: list) -> int:
    """The largest step with prompt tokens to capture as a CUDA graph (0: none). Only over
    the paged Triton kernels, whose launch grids come from tensor shapes alone: MLA's prefill
    splits requests on the host lists, so those models keep such steps eager."""
    mc, sc = config.model_config, config.scheduler_config
    if not (mc.mixed_cuda_graphs and getattr(backend, "supports_mixed_cuda_graphs", False)
            and attn_layers and all(type(layer) is Attention for layer in attn_layers)):
        return 0
    return min(mc.max_cuda_graph_batch_size, sc.max_num_batched_tokens)


class ModelRunner:
    def __init__(self, config: EngineConfig, device: torch.device, is_driver: bool = True) -> None:
        self.config = config
        self.device = device
        self.is_driver = is_driver
        self.block_size = config.cache_config.block_size
        self.dtype = config.model_config.torch_dtype
        self.kv_dtype = config.cache_config.kv_torch_dtype(self.dtype)  # --kv-cache-dtype
        self.states = RequestStates(device)
        # The engine's own stream for rows without a seed (layers/sampler.py's Sampler).
        self.generator = torch.Generator(device=device).manual_seed(
            int(config.model_config.seed or 0))
        self.sampler = Sampler(self.generator)
        # Sampled steps by path: logits gathered to the driver, or sampled from TP shards.
        self.sampling_counts = {"gathered": 0, "from_shards": 0}
        self.sampling_batch = SamplingBatch(device)
        self.model: torch.nn.Module | None = None
        self.attn_layers: list[AttentionLayerBase] = []
        self.kv_caches: list[tuple[torch.Tensor, ...]] = []  # per layer, as it declared them
        self.graph_runner = None  # CudaGraphRunner once captured
        self.pp_group = get_pp_group()
        self.stage: StageLayout | None = None  # set by load_model
        self.stage_timer = StageTimer(device)
        self.last_span: tuple[float, float, float] | None = None  # (start, end, busy s)
        # Test and benchmark hook: each stage sleeps inside its forward, to stand in for a
        # heavy model: stage_delay_s per forward plus stage_delay_per_token_s per token
        # (SHARDSERVE_PP_STAGE_DELAY_S / _PER_TOKEN_S in the engine's environment).
        self.stage_delay_s = 0.0
        self.stage_delay_per_token_s = 0.0
        self._pending_sends: list[tuple[object, torch.Tensor]] = []
        # The last sampling step's ids on the device, and whose they are (row order): the
        # next step's placeholders read them (async scheduling).
        self._prev_sampled: torch.Tensor | None = None
        self._prev_sample_req_ids: list[str] = []
        self.num_placeholder_tokens = 0  # fed from the device so far (a check for tests)
        # CUDA: the GPU's memory before this rank loaded anything (executor/gpu_memory.py),
        # and how profiling split this engine's share, named when the cache is too small.
        self._startup_memory = gpu_memory.snapshot(device) if device.type == "cuda" else None
        self._kv_budget: gpu_memory.KVCacheBudget | None = None
        # Async scheduling under TP: every rank feeds placeholders, so the driver broadcasts
        # each step's sampled ids to its TP peers (a device collective, no host round trip).
        self.share_samples = (bool(config.scheduler_config.async_scheduling)
                              and get_tp_group().world_size > 1)

    # ---- start-up --------------------------------------------------------------------------

    def load_model(self) -> None:
        from shardserve.loader.model_loader import load_model

        start = time.perf_counter()
        self.stage = self._stage_layout()
        self.model = load_model(self.config.model_config, self.device, self.stage)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, AttentionLayerBase)]
        self.vocab_size = int(self.config.model_config.hf_config.vocab_size)
        self.states.vocab_size = self.vocab_size
        logger.info("Model loaded in %.1f s%s", time.perf_counter() - start,
                    f" (pipeline stage {self.pp_group.rank_in_group}: layers "
                    f"{self.stage.start_layer}-{self.stage.end_layer - 1})"
                    if self.pp_group.world_size > 1 else "")

    def _stage_layout(self) -> StageLayout:
        from shardserve.planner.stages import engine_stage_layers

        hf_config = self.config.model_config.hf_config
        pp = self.pp_group
        if pp.world_size == 1:
            return StageLayout.whole(int(hf_config.num_hidden_layers))
        bounds = engine_stage_layers(hf_config, pp.world_size,
                                     self.config.parallel_config.pp_layer_partition)
        start, end = bounds[pp.rank_in_group]
        return StageLayout(start, end, pp.is_first_rank, pp.is_last_rank)

    def kv_bytes_per_block(self) -> int:
        elem = self.kv_dtype.itemsize
        # Each layer declares its own cache (K/V per head, or MLA's one latent per token).
        return sum(math.prod(shape) * elem for layer in self.attn_layers
                   for shape in layer.kv_cache_shapes(1, self.block_size))

    def kv_cache_info(self) -> dict[str, int]:
        """This rank's share of the KV cache: its KV heads per layer (a shard of the model's,
        or one replica when tp_size exceeds them), their size, and the bytes of one block."""
        layer = self.attn_layers[0]
        return {"num_kv_heads": layer.num_kv_heads, "head_size": layer.head_size,
                "num_layers": len(self.attn_layers), "bytes_per_block": self.kv_bytes_per_block()}

    def determine_num_blocks(self) -> int:
        """How many KV blocks fit: on CUDA, what a profiling forward leaves of
        gpu_memory_utilization; on CPU, kv_cache_memory_bytes (default 1 GiB)."""
        return self.check_num_blocks(self.profile_num_blocks())

    @torch.inference_mode()
    def profile_num_blocks(self) -> int:
        """The blocks this rank's memory holds (a TP rank's blocks hold only its KV heads, so
        the same memory holds more of them as tp_size grows). Under TP/PP every rank runs it
        at once (the profiling forward is collective) and the engine takes the minimum."""
        cc = self.config.cache_config
        per_block = self.kv_bytes_per_block()
        if cc.num_gpu_blocks_override is not None:
            return cc.num_gpu_blocks_override
        if cc.kv_cache_memory_bytes is not None:
            return cc.kv_cache_memory_bytes // per_block
        if self.device.type == "cuda":
            return self._profile_cuda_blocks(per_block)
        return _CPU_DEFAULT_KV_BYTES // per_block

    def check_num_blocks(self, num_blocks: int) -> int:
        """num_blocks, or CacheTooSmallError if one max_model_len sequence does not fit."""
        per_block = self.kv_bytes_per_block()
        max_len = self.config.model_config.max_model_len
        needed = -(-max_len // self.block_size)
        if num_blocks < needed:
            split = f" {self._kv_budget.explain()}" if self._kv_budget is not None else ""
            raise CacheTooSmallError(
                f"The KV cache holds {num_blocks} blocks ({num_blocks * self.block_size} tokens) "
                f"but one sequence of max_model_len={max_len} needs {needed} blocks, "
                f"{needed * per_block / 2**20:.1f} MiB.{split} Give the cache more memory "
                "(--kv-cache-memory / --gpu-memory-utilization) or lower --max-model-len.")
        return num_blocks

    def _profile_cuda_blocks(self, per_block: int) -> int:
        gpu_memory.check_fits_at_start(self._startup_memory,
                                       self.config.cache_config.gpu_memory_utilization)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        sc = self.config.scheduler_config
        num_tokens = min(sc.max_num_batched_tokens, self.config.model_config.max_model_len)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        pos = torch.arange(num_tokens, device=self.device)
        intermediate = None
        if self.stage is not None and not self.stage.is_first:
            hidden_size = int(self.config.model_config.hf_config.hidden_size)
            zeros = torch.zeros(num_tokens, hidden_size, dtype=self.dtype, device=self.device)
            intermediate = IntermediateTensors(zeros, zeros.clone())
        with set_forward_context(None):
            hidden = self.model(ids, pos, intermediate)
        if self.stage is None or self.stage.is_last:
            rows = min(sc.max_num_seqs, num_tokens)
            self.model.compute_logits(hidden[:rows], gather_all=False)
        torch.cuda.synchronize(self.device)
        self._kv_budget = budget = gpu_memory.kv_cache_budget(
            self._startup_memory, gpu_memory.snapshot(self.device),
            torch.cuda.max_memory_allocated(self.device),
            self.config.cache_config.gpu_memory_utilization)
        del hidden
        torch.cuda.empty_cache()
        logger.info("Profiled: %s", budget.explain())
        return budget.kv_bytes // per_block

    def init_kv_cache(self, num_blocks: int) -> None:
        backend = select_attention_backend(self.device)
        self.kv_caches = []
        for layer in self.attn_layers:
            caches = tuple(torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
                           for shape in layer.kv_cache_shapes(num_blocks, self.block_size))
            layer.bind_kv_cache(*caches, backend)
            self.kv_caches.append(caches)
        self._maybe_capture_cuda_graphs(backend)
        if self.device.type == "cuda":
            # Triton compiles on first use: do it now for prompt steps too (kernel_warmup.py).
            mc = self.config.model_config
            seconds = warm_up_step_kernels(self.model, self.device, self.dtype,
                                           int(mc.hf_config.hidden_size), self.block_size,
                                           mc.max_model_len, self.stage)
            if self.stage is None or self.stage.is_last:
                start = time.perf_counter()
                from shardserve.kernels.sampling import warm_up
                # Gathered logits are float32; vocabulary shards (TP) the model's dtype.
                dtypes = {torch.float32}
                if (get_tp_group().world_size > 1
                        and not self.config.parallel_config.disable_vocab_parallel_sampling):
                    dtypes.add(self.dtype)
                warm_up(self.model.lm_head.num_embeddings_per_partition, self.device, dtypes)
                seconds += time.perf_counter() - start
            logger.info("Prompt-step kernels compiled and warmed up in %.1f s", seconds)
        max_len = self.config.model_config.max_model_len
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB, %s); max concurrency at "
                    "max_model_len=%d: %.2fx", num_blocks, self.block_size,
                    num_blocks * self.kv_bytes_per_block() / 2**30,
                    str(self.kv_dtype).replace("torch.", ""), max_len,
                    num_blocks * self.block_size / max_len)

    def _maybe_capture_cuda_graphs(self, backend) -> None:
        mc = self.config.model_config
        if (self.device.type != "cuda" or mc.enforce_eager
                or not getattr(backend, "supports_cuda_graphs", False)):
            return
        from shardserve.executor.cuda_graph import CudaGraphRunner
        sc = self.config.scheduler_config
        max_bs = min(mc.max_cuda_graph_batch_size, sc.max_num_seqs)
        runner = CudaGraphRunner(self.model, max_bs, mc.max_model_len, self.block_size,
                                 int(mc.hf_config.hidden_size), self.dtype, self.device,
                                 self.stage,
                                 max_mixed_tokens=max_mixed_graph_tokens(self.config, backend,
                                                                         self.attn_layers),
                                 max_num_seqs=sc.max_num_seqs)
        self.capture_seconds = runner.capture()
        self.graph_runner = runner

    # ---- one step --------------------------------------------------------------------------

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self._execute(scheduler_output, defer=False)

    @torch.inference_mode()
    def execute_model_async(self, scheduler_output: SchedulerOutput) -> "PendingOutput":
        """Queue the step on the device and return without waiting for it: the sampled ids
        are copied to the host in the background; PendingOutput.get() waits for them. The next
        step may be queued first and read this one's tokens on the device (placeholders)."""
        return self._execute(scheduler_output, defer=True)

    def _execute(self, scheduler_output: SchedulerOutput, defer: bool):
        self.states.update(scheduler_output)
        self.last_span = None
        if scheduler_output.is_empty:
            return _ready(ModelRunnerOutput([], []), defer)
        inputs = build_model_inputs(scheduler_output, self.states, self.block_size, self.device)
        if inputs.placeholder_rows:
            self._fill_placeholders(inputs)
        if self.pp_group.world_size > 1:
            return _ready(self._execute_stage(inputs), defer)
        md = inputs.attn_metadata
        if self.graph_runner is not None and self.graph_runner.can_run(md, inputs.input_ids.shape[0]):
            hidden = self.graph_runner.run(inputs.input_ids, inputs.positions, md)
        else:
            with set_forward_context(md):
                hidden = self.model(inputs.input_ids, inputs.positions)
        return self._sample(hidden, inputs, defer)

    def _fill_placeholders(self, inputs: ModelInputs) -> None:
        """Async scheduling: the tokens the previous step sampled, copied on the device into
        this step's input ids (the host does not know them yet)."""
        num = len(inputs.placeholder_rows)
        self.num_placeholder_tokens += num
        if (inputs.placeholder_rows[-1] == num - 1
                and inputs.placeholder_req_ids == self._prev_sample_req_ids):
            # A decode batch of the same requests: row i takes the previous step's sample i
            # (rows ascend from 0, so the last being num - 1 means they are 0..num-1).
            inputs.input_ids[:num].copy_(self._prev_sampled)
            return
        # Built here, not per step: only steps with placeholders need the lookup.
        prev_rows = {rid: i for i, rid in enumerate(self._prev_sample_req_ids)}
        index, source = upload([np.array(inputs.placeholder_rows, dtype=np.int64),
                                np.array([prev_rows[rid] for rid in inputs.placeholder_req_ids],
                                         dtype=np.int64)], self.device)
        inputs.input_ids[index] = self._prev_sampled[source]

    def _execute_stage(self, inputs: ModelInputs) -> ModelRunnerOutput:
        """One pipeline stage's share of a step (see the module doc)."""
        intermediate = None
        if not self.stage.is_first:
            hidden_size = int(self.config.model_config.hf_config.hidden_size)
            both = self.pp_group.recv_tensor((2, inputs.input_ids.shape[0], hidden_size),
                                             self.dtype, self.device)
            intermediate = IntermediateTensors(both[0], both[1])
        self.stage_timer.start()
        if self.stage_delay_s > 0 or self.stage_delay_per_token_s > 0:
            time.sleep(self.stage_delay_s
                       + self.stage_delay_per_token_s * inputs.input_ids.shape[0])
        md = inputs.attn_metadata
        if self.graph_runner is not None and self.graph_runner.can_run(md, inputs.input_ids.shape[0]):
            out = self.graph_runner.run(inputs.input_ids, inputs.positions, md, intermediate)
        else:
            with set_forward_context(md):
                out = self.model(inputs.input_ids, inputs.positions, intermediate)
        if self.stage.is_last:
            result = self._sample(out, inputs)
            self.last_span = self.stage_timer.stop()
            return result
        self._send(torch.stack((out.hidden_states, out.residual)))
        self.last_span = self.stage_timer.stop()
        return ModelRunnerOutput([], [])

    def _send(self, tensor: torch.Tensor) -> None:
        # Asynchronous, so this stage can take the next micro-batch at once; the tensors stay
        # referenced until their sends complete (at most a few are outstanding).
        self._pending_sends.append((self.pp_group.send_tensor(tensor), tensor))
        self._pending_sends = [(w, t) for w, t in self._pending_sends if not w.is_completed()]
        while len(self._pending_sends) > 2 * self.pp_group.world_size:
            self._pending_sends.pop(0)[0].wait()

    def _sample(self, hidden: torch.Tensor, inputs: ModelInputs, defer: bool = False):
        prompt_logprobs = self._prompt_logprobs(hidden, inputs)
        if not inputs.sample_req_ids:
            return _ready(ModelRunnerOutput([], [], None, prompt_logprobs), defer)
        if self._sample_from_shards(inputs):
            return self._sample_shards(hidden, inputs, prompt_logprobs, defer)
        self.sampling_counts["gathered"] += 1
        # Collective under TP: every rank takes part, TP rank 0 receives the whole vocabulary.
        logits = self.model.compute_logits(hidden[inputs.sample_indices], gather_all=False)
        if not self.is_driver:
            if self.share_samples:
                # The driver's sampled ids, for this rank's next step's placeholders.
                ids = torch.empty(len(inputs.sample_req_ids), dtype=torch.long, device=self.device)
                self._remember_samples(get_tp_group().broadcast(ids, src=0), inputs)
            return _ready(ModelRunnerOutput([], []), defer)
        metadata = self.sampling_batch.metadata(inputs.sample_states, inputs.sample_num_outputs,
                                                logits.shape[-1])
        result = self.sampler(logits, metadata)
        if self.share_samples:
            get_tp_group().broadcast(result.sampled_token_ids, src=0)
        self._remember_samples(result.sampled_token_ids, inputs)
        return _driver_output(inputs, result, prompt_logprobs, defer)

    def _sample_from_shards(self, inputs: ModelInputs) -> bool:
        """Whether this step samples from the TP ranks' vocabulary shards (layers/sampler.py):
        decided from the rows' params, so every rank of the group decides alike."""
        return (get_tp_group().world_size > 1
                and not self.config.parallel_config.disable_vocab_parallel_sampling
                and self.sampling_batch.vocab_parallel(inputs.sample_states,
                                                       self.device.type == "cuda",
                                                       self.model.lm_head.num_embeddings))

    def _sample_shards(self, hidden: torch.Tensor, inputs: ModelInputs, prompt_logprobs,
                       defer: bool):
        """Every TP rank samples the same ids from its own shard of the logits: no gather to
        the driver, no broadcast of its choice back."""
        self.sampling_counts["from_shards"] += 1
        shard, vocab_start, num_valid = self.model.lm_head.compute_logits_shard(
            hidden[inputs.sample_indices])
        vocab_size = self.model.lm_head.num_embeddings
        metadata = self.sampling_batch.metadata(inputs.sample_states, inputs.sample_num_outputs,
                                                vocab_size)
        ids = sample_vocab_shards(shard, vocab_start, vocab_size, num_valid, metadata,
                                  get_tp_group(), self.generator)
        self._remember_samples(ids, inputs)
        if not self.is_driver:
            return _ready(ModelRunnerOutput([], []), defer)
        return _driver_output(inputs, SamplerOutput(ids), prompt_logprobs, defer)

    def _remember_samples(self, ids: torch.Tensor, inputs: ModelInputs) -> None:
        self._prev_sampled = ids
        self._prev_sample_req_ids = inputs.sample_req_ids

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: ModelInputs) -> dict[str, list[TokenLogprobs]]:
        out: dict[str, list[TokenLogprobs]] = {}
        for rid, row0, start, num_pred in inputs.prompt_logprob_spans:
            state = self.states.states[rid]
            if num_pred <= 0:
                continue
            logits = self.model.compute_logits(hidden[row0:row0 + num_pred], gather_all=False)
            if not self.is_driver:
                continue
            next_ids = torch.tensor(state.token_ids[start + 1:start + 1 + num_pred], device=self.device)
            out[rid] = compute_prompt_logprobs(logits, next_ids, state.sampling_params.prompt_logprobs)
        return out



def _driver_output(inputs: ModelInputs, result: SamplerOutput, prompt_logprobs, defer: bool):
    """The sampling rank's step output: ready now, or pending while the ids reach the host."""
    if not defer:
        return ModelRunnerOutput(inputs.sample_req_ids, result.tolist(), result.logprobs,
                                 prompt_logprobs)
    return PendingOutput(inputs.sample_req_ids, result, prompt_logprobs)


class PendingOutput:
    """A step's output whose sampled ids may still be on their way to the host."""

    def __init__(self, req_ids: list[str], result, prompt_logprobs) -> None:
        self.req_ids = req_ids
        self.result = result
        self.prompt_logprobs = prompt_logprobs
        self.host_ids: torch.Tensor | None = None
        self.event = None
        ids = result.sampled_token_ids
        if ids.device.type == "cuda" and result._host_token_ids is None:
            self.host_ids = ids.to("cpu", non_blocking=True)  # lands in pinned memory
            self.event = torch.cuda.Event()
            self.event.record()

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def get(self) -> ModelRunnerOutput:
        if self.event is not None:
            self.event.synchronize()
            sampled = self.host_ids.tolist()
        else:
            sampled = self.result.tolist()
        return ModelRunnerOutput(self.req_ids, sampled, self.result.logprobs, self.prompt_logprobs)


class _Ready:
    """PendingOutput's interface around an output that is already on the host."""

    def __init__(self, output: ModelRunnerOutput) -> None:
        self.output = output

    def ready(self) -> bool:
        return True

    def get(self) -> ModelRunnerOutput:
        return self.output


def _ready(output: ModelRunnerOutput, defer: bool):
    return _Ready(output) if defer else output
