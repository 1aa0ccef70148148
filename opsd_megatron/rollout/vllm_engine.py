"""The colocated vLLM rollout engine (optional extra ``vllm``): every vLLM call lives in this file.

vLLM runs inside the training processes (``distributed_executor_backend="external_launcher"``,
its TP equal to the trainer's) with sleep mode: asleep during the teacher/student passes, woken for
rollouts. Refit order after an optimizer step: wake the weights, load the new weights bucket by
bucket from ``refit.stream_hf_weights`` (LoRA merged), then wake the KV cache — waking both at once
is a known OOM. Sampling parameters mirror the Megatron sampler's.

Untested here: vLLM cannot be installed on the development or CI machines. The stream it consumes
is tested against HF transformers (tests/rollout/test_refit.py).
"""

from __future__ import annotations

import time

from opsd_megatron.rollout.base import RolloutResult
from opsd_megatron.rollout.refit import stream_hf_weights


def _require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise ImportError("rollout.engine=vllm needs vLLM: pip install 'opsd-megatron[vllm]' "
                          "(GPU clusters; use rollout.engine=megatron elsewhere)") from err
    return vllm


def _vllm_model(llm):
    """The torch module inside a colocated (external_launcher) engine; its path moved across versions."""
    engine = llm.llm_engine
    for path in ("model_executor.driver_worker.worker.model_runner.model",
                 "model_executor.driver_worker.model_runner.model"):
        obj = engine
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
            return obj
        except AttributeError:
            continue
    raise RuntimeError("cannot find the model inside this vLLM version's engine for weight refit")


class VLLMEngine:
    def __init__(self, hf_dir: str, *, tensor_parallel_size: int, temperature: float, top_k: int, top_p: float,
                 seed: int, gpu_memory_utilization: float = 0.35, max_model_len: int = 8192,
                 bucket_bytes: int = 512 << 20):
        vllm = _require_vllm()
        self.llm = vllm.LLM(model=hf_dir, tensor_parallel_size=tensor_parallel_size,
                            distributed_executor_backend="external_launcher", enable_sleep_mode=True,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            seed=seed, trust_remote_code=False)
        self.params = dict(temperature=temperature, top_k=top_k if top_k > 0 else -1, top_p=top_p, logprobs=0,
                           seed=seed)
        self.bucket_bytes = bucket_bytes
        self.last_refit_s = 0.0
        self.llm.sleep(level=1)

    def refit(self, model, arch) -> float:
        """Push the trainer's current weights into vLLM (collective on the training ranks)."""
        start = time.perf_counter()
        self.llm.wake_up(tags=["weights"])
        target = _vllm_model(self.llm)
        for bucket in stream_hf_weights(model, arch, self.bucket_bytes, merge_lora=True):
            target.load_weights(weights=bucket)
        self.llm.wake_up(tags=["kv_cache"])
        self.last_refit_s = time.perf_counter() - start
        return self.last_refit_s

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> RolloutResult:
        vllm = _require_vllm()
        params = vllm.SamplingParams(max_tokens=max_new_tokens, **self.params)
        outputs = self.llm.generate([vllm.TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        responses, logprobs, finished = [], [], []
        for out in outputs:
            comp = out.outputs[0]
            responses.append(list(comp.token_ids))
            logprobs.append([lp[tok].logprob for lp, tok in zip(comp.logprobs, comp.token_ids)])
            finished.append(comp.finish_reason == "stop")
        self.llm.sleep(level=1)
        return RolloutResult(responses, logprobs, finished)
