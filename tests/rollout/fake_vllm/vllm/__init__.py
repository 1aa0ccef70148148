"""An HF-transformers stand-in for the slice of vLLM's API that ``opsd_megatron.rollout.vllm_engine``
uses (vLLM cannot be installed on these machines). It keeps vLLM's contract strict, so the adapter
is tested for what matters: the engine is built colocated with sleep mode and dummy weights; it
generates only when fully awake, after every weight has been loaded; weights wake before the KV
cache; log-probs are the processed (post-temperature) ones; a LoRARequest's PEFT adapter is applied.
Put ``tests/rollout/fake_vllm`` on PYTHONPATH to use it.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch

EVENTS_FILE = os.environ.get("FAKE_VLLM_EVENTS")  # one line per call, for the tests to read


def _event(text: str) -> None:
    if EVENTS_FILE:
        with open(f"{EVENTS_FILE}.{os.getpid()}", "a") as f:
            f.write(text + "\n")


@dataclass
class Logprob:
    logprob: float


class SamplingParams:
    def __init__(
        self,
        temperature=1.0,
        top_k=-1,
        top_p=1.0,
        logprobs=None,
        max_tokens=16,
        stop_token_ids=None,
    ):
        assert top_k == -1 and top_p == 1.0, "the stand-in samples plain temperature only"
        self.temperature, self.logprobs, self.max_tokens = temperature, logprobs, max_tokens
        self.stop_token_ids = list(stop_token_ids or [])

    def clone(self):
        return copy.deepcopy(self)


def TokensPrompt(prompt_token_ids):  # noqa: N802 (vLLM's name)
    return {"prompt_token_ids": list(prompt_token_ids)}


class _Runner:
    def __init__(self, llm):
        self.llm = llm

    def load_weights(self, weights):
        llm = self.llm
        assert llm.awake == {"weights"}, (
            f"load weights after waking the weights only (awake: {llm.awake})"
        )
        state = llm.hf.state_dict()
        for name, tensor in weights:
            assert name in state, f"unknown HF weight {name}"
            state[name].copy_(tensor)
            llm.loaded.add(name)


class LLM:
    def __init__(
        self,
        model,
        tensor_parallel_size,
        distributed_executor_backend,
        enable_sleep_mode,
        load_format,
        logprobs_mode,
        seed,
        enable_lora=False,
        max_lora_rank=16,
        **_,
    ):
        from transformers import AutoConfig, AutoModelForCausalLM

        assert distributed_executor_backend == "external_launcher" and enable_sleep_mode
        assert load_format == "dummy" and logprobs_mode == "processed_logprobs"
        self.hf = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(model), torch_dtype=torch.float32
        ).eval()
        self.required = {
            n
            for n in self.hf.state_dict()
            if not (n == "lm_head.weight" and self.hf.config.tie_word_embeddings)
        }
        self.loaded, self.awake, self.enable_lora = set(), {"weights", "kv_cache"}, enable_lora
        self.generator = torch.Generator().manual_seed(seed)
        runner = SimpleNamespace(model=_Runner(self))
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(
                driver_worker=SimpleNamespace(worker=SimpleNamespace(model_runner=runner))
            )
        )
        _event(f"init tp={tensor_parallel_size} lora={enable_lora}")

    def sleep(self, level=1):
        self.awake = set()
        _event(f"sleep {level}")

    def wake_up(self, tags=None):
        tags = set(tags or ("weights", "kv_cache"))
        assert not ("kv_cache" in tags and "weights" not in self.awake | tags - {"kv_cache"}), (
            "wake the weights before the KV cache"
        )
        self.awake |= tags
        _event(f"wake {','.join(sorted(tags))}")

    @torch.no_grad()
    def generate(self, prompts, params, lora_request=None, use_tqdm=False):
        assert self.awake == {"weights", "kv_cache"}, "generate while asleep"
        assert self.required <= self.loaded, (
            f"weights never loaded: {sorted(self.required - self.loaded)[:3]}"
        )
        model = self.hf
        if lora_request is not None:
            from peft import PeftModel

            assert self.enable_lora
            model = PeftModel.from_pretrained(copy.deepcopy(self.hf), lora_request.lora_path).eval()
        _event(f"generate {len(prompts)} lora={lora_request.lora_int_id if lora_request else None}")
        outs = []
        for p in prompts:
            ids, toks, lps, reason = list(p["prompt_token_ids"]), [], [], "length"
            for _ in range(params.max_tokens):
                logits = model(torch.tensor([ids])).logits[0, -1].float() / params.temperature
                logp = torch.log_softmax(logits, -1)
                tok = int(torch.multinomial(logp.exp(), 1, generator=self.generator))
                toks.append(tok)
                lps.append({tok: Logprob(float(logp[tok]))})
                ids.append(tok)
                if tok in params.stop_token_ids:
                    reason = "stop"
                    break
            outs.append(
                SimpleNamespace(
                    outputs=[SimpleNamespace(token_ids=toks, logprobs=lps, finish_reason=reason)]
                )
            )
        return outs
