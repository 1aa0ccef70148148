"""The colocated vLLM rollout engine (optional extra ``vllm``): every vLLM call lives in this file.

vLLM runs inside the training processes (``distributed_executor_backend="external_launcher"``,
its TP equal to the trainer's, one engine per DP rank) with sleep mode: asleep during the teacher
and student passes, woken for rollouts. It starts from dummy weights and is refit before every
generation (the weights changed by one optimizer step since): wake the weights, load the new ones
bucket by bucket from ``refit.stream_hf_weights``, then wake the KV cache — waking both at once is
a known OOM. ``rollout.vllm.lora_mode``: ``merged`` streams base+LoRA merged every step;
``adapter`` loads the frozen base once and pushes only the adapters, as a PEFT directory that
vLLM loads with a ``LoRARequest``. Sampling parameters mirror the Megatron sampler's; log-probs
are vLLM's processed ones (after temperature), as the Megatron sampler reports them.

vLLM cannot be installed on the development or CI machines: tests run this adapter against an
HF-transformers stand-in of the same API (tests/rollout/fake_vllm) and skip the real-vLLM test.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch.distributed as dist

from opsd_megatron.platform.parallel import ParallelGroups
from opsd_megatron.rollout.base import RolloutResult
from opsd_megatron.rollout.refit import stream_hf_weights


def _require_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "rollout.engine=vllm needs vLLM: pip install 'opsd-megatron[vllm]' "
            "(GPU clusters; use rollout.engine=megatron elsewhere)"
        ) from err
    return vllm


def _vllm_model(llm):
    """The torch module inside a colocated (external_launcher) engine; its path moved across versions."""
    engine = llm.llm_engine
    for path in (
        "model_executor.driver_worker.worker.model_runner.model",
        "model_executor.driver_worker.model_runner.model",
    ):
        obj = engine
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
            return obj
        except AttributeError:
            continue
    raise RuntimeError("cannot find the model inside this vLLM version's engine for weight refit")


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
    """Colocated vLLM: sleeps beside training, woken and refitted with the current weights per batch."""

    def __init__(self, model, arch, cfg, tokenizer, stop_ids: list[int], groups: ParallelGroups):
        vllm = _require_vllm()

        r, v = cfg.rollout, cfg.rollout.vllm
        self.model, self.arch, self.cfg = model, arch, cfg
        self.adapter_mode = v.lora_mode == "adapter" and cfg.lora is not None
        self.out = Path(cfg.trainer.output_dir) / "vllm"
        model_dir = write_model_dir(cfg, tokenizer, self.out / "model")
        self.llm = vllm.LLM(
            model=str(model_dir),
            tensor_parallel_size=groups.tp_size,
            distributed_executor_backend="external_launcher",
            enable_sleep_mode=True,
            gpu_memory_utilization=v.gpu_memory_utilization,
            max_model_len=v.max_model_len,
            seed=r.seed + groups.dp_rank,
            load_format="dummy",
            enforce_eager=v.enforce_eager,
            logprobs_mode="processed_logprobs",
            enable_lora=self.adapter_mode,
            max_lora_rank=cfg.lora.rank if self.adapter_mode else 16,
            trust_remote_code=False,
        )
        self.params = vllm.SamplingParams(
            temperature=r.temperature,
            top_k=r.top_k if r.top_k > 0 else -1,
            top_p=r.top_p,
            logprobs=0,
            max_tokens=r.max_new_tokens,
            stop_token_ids=list(stop_ids),
        )
        self.bucket_bytes = v.bucket_mb << 20
        self.version, self.base_loaded, self.lora_request = 0, False, None
        self.last_refit_s, self.calls = 0.0, 0
        self.llm.sleep(level=1)

    def refit(self) -> float:
        """Push the trainer's current weights into vLLM (collective on the training ranks)."""
        start = time.perf_counter()
        self.version += 1
        self.llm.wake_up(tags=["weights"])
        if not (self.adapter_mode and self.base_loaded):
            target = _vllm_model(self.llm)
            for bucket in stream_hf_weights(
                self.model, self.arch, self.bucket_bytes, merge_lora=not self.adapter_mode
            ):
                target.load_weights(weights=bucket)
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

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> RolloutResult:
        """Refit, wake, sample, sleep; returns ids and vLLM's log-probs."""
        vllm = _require_vllm()
        self.refit()
        self.calls += 1
        params = self.params.clone() if hasattr(self.params, "clone") else self.params
        params.max_tokens = max_new_tokens
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
        self.llm.sleep(level=1)
        return RolloutResult(responses, logprobs, finished)
