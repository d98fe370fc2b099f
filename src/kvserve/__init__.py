"""kvserve: an LLM serving engine. `from kvserve import LLM, SamplingParams` as with vLLM."""
from kvserve.inputs import TextPrompt, TokensPrompt
from kvserve.outputs import CompletionOutput, Logprob, RequestOutput
from kvserve.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM", "LLMEngine", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob",
    "RequestOutputKind", "TextPrompt", "TokensPrompt", "__version__",
]  # fmt: skip


def __getattr__(name: str):
    # The engine pulls in torch; load it on first use so `import kvserve` stays cheap.
    if name == "LLM":
        from kvserve.entrypoints.llm import LLM

        return LLM
    if name == "LLMEngine":
        from kvserve.engine.llm_engine import LLMEngine

        return LLMEngine
    if name == "EngineArgs":
        from kvserve.engine.arg_utils import EngineArgs

        return EngineArgs
    raise AttributeError(f"module 'kvserve' has no attribute {name!r}")
