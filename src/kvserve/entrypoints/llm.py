"""The offline API, shaped like vLLM's `LLM`: code written for vLLM runs after changing the import."""
from __future__ import annotations

import logging
import sys
from typing import Any, Optional, Sequence, Union

from tqdm import tqdm

from kvserve.engine.arg_utils import EngineArgs
from kvserve.engine.llm_engine import LLMEngine
from kvserve.inputs import PromptType
from kvserve.outputs import RequestOutput
from kvserve.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

# vLLM constructor arguments that mean nothing here; accepted so vLLM code runs unchanged.
_IGNORED_VLLM_ARGS = {
    "trust_remote_code", "swap_space", "disable_log_stats", "tokenizer_mode", "revision",
    "tokenizer_revision", "download_dir", "load_format", "gpu_memory_utilization", "disable_custom_all_reduce",
    "max_seq_len_to_capture", "hf_token", "hf_overrides", "cpu_offload_gb",
}  # fmt: skip

Conversation = list[dict[str, Any]]


class LLM:
    def __init__(
        self,
        model: Optional[str] = None,
        tokenizer: Optional[str] = None,
        dtype: str = "auto",
        max_model_len: Optional[int] = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: Optional[int] = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        device: str = "auto",
        kv_cache_memory_bytes: Optional[int] = None,
        tensor_parallel_size: int = 1,
        quantization: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        _ensure_logging()
        unknown = set(kwargs) - _IGNORED_VLLM_ARGS - set(EngineArgs.__dataclass_fields__)
        if unknown:
            raise TypeError(f"LLM() got unexpected arguments: {', '.join(sorted(unknown))}")
        if tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 is not supported yet; use 1.")
        ignored = sorted(set(kwargs) & _IGNORED_VLLM_ARGS)
        if ignored:
            logger.info("Ignoring vLLM arguments that do not apply here: %s", ", ".join(ignored))
        extra = {k: v for k, v in kwargs.items() if k in EngineArgs.__dataclass_fields__}
        args = EngineArgs(
            model=model, tokenizer=tokenizer, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
            enable_prefix_caching=enable_prefix_caching, seed=seed, device=device,
            kv_cache_memory_bytes=kv_cache_memory_bytes, quantization=quantization, **extra,
        )  # fmt: skip
        self.llm_engine = LLMEngine.from_engine_args(args)
        self._counter = 0

    def get_tokenizer(self):
        return self.llm_engine.get_tokenizer()

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order."""
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            params_list = [SamplingParams()] * len(prompt_list)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"got {len(prompt_list)} prompts but {len(params_list)} sampling params; pass one, or one per prompt"
                )
        return self._run(prompt_list, params_list, use_tqdm)

    def chat(
        self,
        messages: Union[Conversation, list[Conversation]],
        sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
        use_tqdm: bool = True,
        chat_template: Optional[str] = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: Optional[dict[str, Any]] = None,
        tools: Optional[list[dict[str, Any]]] = None,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then generate. tools: OpenAI-style
        function definitions, the template's `tools` (as vLLM's LLM.chat passes them)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.get_tokenizer()
        prompts = []
        for conversation in conversations:
            ids = tokenizer.apply_chat_template(
                conversation,
                tools=tools,
                chat_template=chat_template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=True,
                **(chat_template_kwargs or {}),
            )
            prompts.append({"prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list[PromptType], params_list: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        # Grammars first, each distinct one once (in parallel): a constraint that does not compile
        # raises its ValueError before anything is queued.
        constraints = [p.structured_outputs for p in params_list if p.structured_outputs is not None]
        for future in [engine.structured_output.submit(c) for c in constraints]:
            future.result()
        ids = []
        try:
            for prompt, params in zip(prompts, params_list):
                params = params.clone()
                params.output_kind = RequestOutputKind.FINAL_ONLY
                request_id = str(self._counter)
                self._counter += 1
                engine.add_request(request_id, prompt, params)
                ids.append(request_id)
        except Exception:
            engine.abort_request(ids)
            raise
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", file=sys.stderr, disable=not use_tqdm, dynamic_ncols=True)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [finished[i] for i in ids]


def _as_prompt_list(prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single token-id prompt
    return prompts


def _ensure_logging() -> None:
    """kvserve logs to stderr at INFO unless the application configured logging itself."""
    root = logging.getLogger("kvserve")
    if not root.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
