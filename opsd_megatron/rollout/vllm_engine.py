"""The colocated vLLM rollout engine (optional extra ``vllm``, vLLM 0.32.0): every vLLM call lives
in this file, each checked against that release's source (``vllm/entrypoints/llm.py``,
``vllm/engine/arg_utils.py``, ``vllm/v1/worker/gpu_worker.py``, ``vllm/sampling_params.py``).

vLLM runs inside the training processes (``distributed_executor_backend="external_launcher"``: the
engine core is in-process, its TP equal to the trainer's, one engine per DP rank and PP stage) with
sleep mode: asleep during the teacher and student passes, woken for rollouts. It starts from dummy
weights and is refit before every generation: wake the weights, load the new ones bucket by bucket
from ``refit.stream_hf_weights`` through ``LLM.apply_model`` (the public way to reach the model in
each worker), then wake the KV cache — waking both at once is a known OOM.

* ``rollout.vllm.lora_mode``: ``merged`` streams base+LoRA merged every step, so the weights need
  not survive a sleep: level 2 (discarded; no host copy). ``adapter`` loads the frozen base once
  and pushes only the adapters (a PEFT directory, ``LoRARequest``): level 1 (the base is kept in
  host memory across sleeps). LoRA ranks are rounded up to vLLM's allowed ones.
* Memory: vLLM checks at start that ``gpu_memory_utilization`` × total memory is free, so its
  share is ``rollout.vllm.memory_fraction`` of what is free once the trainer is built
  (``VLLMConfig.engine_memory``); ``max_model_len`` is the longest prompt plus the rollout length,
  capped at the model's ``max_position_embeddings`` (``VLLMConfig.model_len``).
* Log-probs: ``processed_logprobs``, those of the sampling distribution (temperature, top-k, top-p,
  renormalised) — what the Megatron sampler reports and what the trainer recomputes
  (``RolloutConfig.logprob_distribution``).
* Randomness: one ``SamplingParams(seed=…)`` per request, from (run seed, step, problem, sample)
  (``StepData.request_seeds``), so rollouts are identical on every TP rank and PP stage and
  after a resume, whatever else draws random numbers. vLLM reseeds the process's global RNGs while
  it starts; the trainer's are restored afterwards.

vLLM cannot be installed on the development or CI machines: tests run this adapter against a
strict HF-transformers stand-in of the same API (tests/rollout/fake_vllm) and skip the real one.
"""

from __future__ import annotations

import json
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

VLLM_VERSION = "0.32.0"  # the release the calls below were checked against (extra: vllm==0.32.0)
ALLOWED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks


def _require_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "rollout.engine=vllm needs vLLM: pip install 'opsd-megatron[vllm]' "
            "(GPU clusters; use rollout.engine=megatron elsewhere)"
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


def _free_and_total_memory() -> tuple[int, int] | None:
    return torch.cuda.mem_get_info() if torch.cuda.is_available() else None


class VLLMEngine:
    """Colocated vLLM: sleeps beside training, woken and refitted with the current weights per
    batch."""

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
    ):
        """``longest_prompt``: the longest student prompt of the data (tokens), for max_model_len;
        ``reserve_bytes``: GPU memory the trainer allocates after vLLM starts (Adam's moments)."""
        vllm = _require_vllm()

        r, v = cfg.rollout, cfg.rollout.vllm
        self.model, self.arch, self.cfg = model, arch, cfg
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
        memory = _free_and_total_memory()
        lora = {}
        if self.adapter_mode:
            lora = dict(enable_lora=True, max_loras=1, max_lora_rank=vllm_lora_rank(cfg.lora.rank))
        model_dir = write_model_dir(cfg, tokenizer, self.out / "model")
        with global_rng_preserved():
            self.llm = vllm.LLM(
                model=str(model_dir),
                tensor_parallel_size=groups.tp_size,
                distributed_executor_backend="external_launcher",
                enable_sleep_mode=True,
                dtype=str(params_dtype(cfg.model)).removeprefix("torch."),  # the trainer's
                max_model_len=self.max_model_len,
                seed=r.seed,
                load_format="dummy",
                enforce_eager=v.enforce_eager,
                logprobs_mode="processed_logprobs",
                trust_remote_code=False,
                **(v.engine_memory(*memory, reserve_bytes) if memory else {}),
                **lora,
            )
        self.stop_ids = list(stop_ids)
        self.bucket_bytes = v.bucket_mb << 20
        self.version, self.base_loaded, self.lora_request = 0, False, None
        self.last_refit_s, self.calls = 0.0, 0
        self.llm.sleep(level=self.sleep_level)

    def refit(self) -> float:
        """Push the trainer's current weights into vLLM (collective on the training ranks)."""
        start = time.perf_counter()
        self.version += 1
        self.llm.wake_up(tags=["weights"])
        if not (self.adapter_mode and self.base_loaded):
            for bucket in stream_hf_weights(
                self.model, self.arch, self.bucket_bytes, merge_lora=not self.adapter_mode
            ):
                self.llm.apply_model(lambda m, b=bucket: m.load_weights(weights=b))
            self.base_loaded = True
        if self.adapter_mode:
            self.lora_request = self._push_adapter()
        self.llm.wake_up(tags=["kv_cache"])
        self.last_refit_s = time.perf_counter() - start
        return self.last_refit_s

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
        self.llm.sleep(level=self.sleep_level)
        return RolloutResult(responses, logprobs, finished)
