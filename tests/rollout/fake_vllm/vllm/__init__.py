"""An HF-transformers stand-in for the slice of vLLM 0.32's API that
``opsd_megatron.rollout.vllm_engine`` uses (vLLM cannot be installed on these machines). It is as
strict as the real engine where a first GPU run would break, so the adapter is tested for that:

* constructor and ``SamplingParams`` arguments are checked against vLLM 0.32.0's parameter names
  (``_api.py``); ``max_model_len`` may not exceed the model's ``max_position_embeddings``;
  ``max_lora_rank`` must be one of vLLM's allowed ranks; ``gpu_memory_utilization`` in (0, 1];
* colocated, sleep mode, dummy weights, processed log-probs; starting reseeds the process's global
  RNGs, as vLLM's ``set_random_seed`` does;
* it is a GPU platform (``vllm.platforms.current_platform``: sleep mode available), the part of
  the adapter that CPU vLLM cannot run (tests/rollout/test_vllm_cpu_engine.py runs the rest on
  the real engine);
* sleep level 1 keeps the weights, level 2 discards them (NaN here) — generating before every
  weight was loaded again fails; weights wake before the KV cache; weights load only through the
  worker's ``reload_weights`` (``LLM.collective_rpc``), in checkpoint format, while only the
  weights are awake;
* sampling as vLLM's sampler: temperature, then top-k, then top-p (sort-based, as
  ``v1/sample/ops/topk_topp_sampler.py``), log-probs of that renormalised distribution; a request
  with ``seed`` draws from its own generator, one without from the engine's stream, which starts
  at the engine's ``seed`` whenever an engine starts (so unseeded rollouts repeat step 1's after a
  resume); greedy at temperature 0 with T=1 log-probs; prompts must fit ``max_model_len``.

Put ``tests/rollout/fake_vllm`` on PYTHONPATH to use it. ``FAKE_VLLM_EVENTS``: a file prefix; each
process appends one line per call (with a digest of every generation's tokens).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from vllm._api import (
    ENGINE_ARGS,
    LLM_INIT,
    LOGPROBS_MODES,
    MAX_LORA_RANKS,
    SAMPLING_PARAMS,
)

__version__ = "0.32.0"
EVENTS_FILE = os.environ.get("FAKE_VLLM_EVENTS")


def _event(text: str) -> None:
    if EVENTS_FILE:
        with open(f"{EVENTS_FILE}.{os.getpid()}", "a") as f:
            f.write(text + "\n")


def _reject_unknown(kind: str, given, known) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TypeError(f"{kind}: unexpected arguments {unknown} (not in vLLM 0.32.0)")


@dataclass
class Logprob:
    logprob: float


class SamplingParams:
    def __init__(self, **kw):
        _reject_unknown("SamplingParams", kw, SAMPLING_PARAMS)
        self.temperature = kw.get("temperature", 1.0)
        self.top_k = kw.get("top_k", 0)
        self.top_p = kw.get("top_p", 1.0)
        self.seed = kw.get("seed")
        self.logprobs = kw.get("logprobs")
        self.max_tokens = kw.get("max_tokens", 16)
        self.stop_token_ids = list(kw.get("stop_token_ids") or [])
        if self.top_k < -1 or not 0 < self.top_p <= 1 or self.temperature < 0:
            raise ValueError(f"bad sampling parameters {kw}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")

    def clone(self):
        return copy.deepcopy(self)


def TokensPrompt(prompt_token_ids):  # noqa: N802 (vLLM's name)
    return {"prompt_token_ids": list(prompt_token_ids)}


def _processed_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """vLLM's order: temperature, top-k (ties with the k-th kept), top-p over the top-k-masked
    distribution (drop the least likely tokens while their cumulative mass is <= 1 - p)."""
    z = logits / p.temperature
    if p.top_k > 0:
        kth = torch.sort(z, descending=True).values[min(p.top_k, z.numel()) - 1]
        z = torch.where(z < kth, -torch.inf, z)
    if p.top_p < 1:
        order = torch.argsort(z)
        drop = torch.cumsum(torch.softmax(z[order], -1), -1) <= 1 - p.top_p
        drop[-1] = False
        removed = torch.zeros_like(drop)
        removed[order] = drop
        z = torch.where(removed, -torch.inf, z)
    return z


class LLM:
    def __init__(self, model, **kw):
        from transformers import AutoConfig, AutoModelForCausalLM

        _reject_unknown("LLM", kw, LLM_INIT | ENGINE_ARGS)
        assert kw.get("distributed_executor_backend") == "external_launcher"
        assert kw.get("enable_sleep_mode") and kw.get("load_format") == "dummy"
        assert kw.get("logprobs_mode") in LOGPROBS_MODES
        assert kw["logprobs_mode"] == "processed_logprobs", "the trainer's semantics"
        assert kw.get("dtype") in ("bfloat16", "float16", "float32"), "pass the trainer's dtype"
        config = AutoConfig.from_pretrained(model)
        self.max_model_len = kw.get("max_model_len") or config.max_position_embeddings
        if self.max_model_len > config.max_position_embeddings:
            raise ValueError(
                f"User-specified max_model_len ({self.max_model_len}) is greater than the derived "
                f"max_model_len (max_position_embeddings={config.max_position_embeddings})"
            )
        util = kw.get("gpu_memory_utilization", 0.92)
        if not 0 < util <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {util}")
        self.enable_lora = bool(kw.get("enable_lora"))
        if self.enable_lora and kw.get("max_lora_rank", 16) not in MAX_LORA_RANKS:
            raise ValueError(f"max_lora_rank {kw['max_lora_rank']} not in {MAX_LORA_RANKS}")
        self.max_lora_rank = kw.get("max_lora_rank", 16)
        seed = kw.get("seed", 0)
        random.seed(seed)  # vLLM's set_random_seed, while the worker starts
        np.random.seed(seed)
        torch.manual_seed(seed)
        self.stream = torch.Generator().manual_seed(seed)  # what unseeded requests draw from
        self.hf = AutoModelForCausalLM.from_config(
            config, torch_dtype=getattr(torch, kw["dtype"])
        ).eval()
        self.required = {
            n
            for n in self.hf.state_dict()
            if not (n == "lm_head.weight" and self.hf.config.tie_word_embeddings)
        }
        self.loaded, self.awake, self.sleeping = set(), {"weights", "kv_cache"}, 0
        _event(
            "init "
            + json.dumps(
                {
                    "tp": kw.get("tensor_parallel_size", 1),
                    "lora": self.enable_lora,
                    "max_lora_rank": self.max_lora_rank if self.enable_lora else None,
                    "max_model_len": self.max_model_len,
                    "dtype": kw["dtype"],
                },
                sort_keys=True,
            )
        )

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        assert method == "reload_weights", f"the stand-in serves reload_weights only, not {method}"
        return [self._reload_weights(*args, **(kwargs or {}))]

    def _reload_weights(self, weights_iterator=None, weights_path=None, is_checkpoint_format=True):
        assert weights_iterator is not None and is_checkpoint_format, "HF-named full tensors"
        assert self.awake == {"weights"}, (
            f"load weights after waking the weights only (awake: {self.awake})"
        )
        state = self.hf.state_dict()
        with torch.no_grad():
            for name, tensor in weights_iterator:
                assert name in state, f"unknown HF weight {name}"
                state[name].copy_(tensor)
                self.loaded.add(name)

    def sleep(self, level=1):
        assert level in (1, 2)
        if level == 2:  # weights discarded: what was loaded is gone
            with torch.no_grad():
                for p in self.hf.parameters():
                    p.fill_(torch.nan)
            self.loaded = set()
        self.awake, self.sleeping = set(), level
        _event(f"sleep {level}")

    def wake_up(self, tags=None):
        tags = set(tags or ("weights", "kv_cache"))
        assert not ("kv_cache" in tags and "weights" not in self.awake | tags - {"kv_cache"}), (
            "wake the weights before the KV cache"
        )
        self.awake |= tags
        _event(f"wake {','.join(sorted(tags))}")

    @torch.no_grad()
    def generate(self, prompts, sampling_params, lora_request=None, use_tqdm=False):
        assert self.awake == {"weights", "kv_cache"}, "generate while asleep"
        assert self.required <= self.loaded, (
            f"weights never loaded: {sorted(self.required - self.loaded)[:3]}"
        )
        params = (
            list(sampling_params)
            if isinstance(sampling_params, (list, tuple))
            else [sampling_params] * len(prompts)
        )
        assert len(params) == len(prompts)
        model = self.hf
        if lora_request is not None:
            from peft import PeftConfig, PeftModel

            assert self.enable_lora
            rank = PeftConfig.from_pretrained(lora_request.lora_path).r
            assert rank <= self.max_lora_rank, f"adapter rank {rank} > max_lora_rank"
            model = PeftModel.from_pretrained(copy.deepcopy(self.hf), lora_request.lora_path).eval()
        outs = [self._one(model, p["prompt_token_ids"], sp) for p, sp in zip(prompts, params)]
        digest = hashlib.sha256(json.dumps([o.outputs[0].token_ids for o in outs]).encode())
        _event(
            f"generate {len(prompts)} lora={lora_request.lora_int_id if lora_request else None} "
            f"seeded={all(sp.seed is not None for sp in params)} digest={digest.hexdigest()[:16]}"
        )
        return outs

    def _one(self, model, prompt, p: SamplingParams):
        if not 0 < len(prompt) < self.max_model_len:
            raise ValueError(
                f"The decoder prompt (length {len(prompt)}) is longer than the maximum model "
                f"length of {self.max_model_len}"
            )
        gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else self.stream
        ids, toks, lps, reason = list(prompt), [], [], "length"
        for _ in range(min(p.max_tokens, self.max_model_len - len(prompt))):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            if p.temperature < 1e-5:  # greedy: the raw distribution's log-prob
                logp = torch.log_softmax(logits, -1)
                tok = int(logp.argmax())
            else:
                logp = torch.log_softmax(_processed_logits(logits, p), -1)
                tok = int(torch.multinomial(logp.exp(), 1, generator=gen))
            toks.append(tok)
            lps.append({tok: Logprob(float(logp[tok]))})
            ids.append(tok)
            if tok in p.stop_token_ids:
                reason = "stop"
                break
        return SimpleNamespace(
            outputs=[SimpleNamespace(token_ids=toks, logprobs=lps, finish_reason=reason)]
        )


__all__ = ["LLM", "Logprob", "SamplingParams", "TokensPrompt"]
