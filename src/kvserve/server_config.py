"""ServerConfig: every `kvserve serve` setting, merged once at the edge and frozen.

Precedence, lowest to highest: the defaults below < a YAML/JSON file (`--config`) < environment variables
`KVSERVE_<FLAG>` (e.g. KVSERVE_MAX_NUM_SEQS=64) < the command line. This is the only module that reads the
environment for the server; everything below gets the frozen ServerConfig (or the EngineArgs it makes).

One table (the dataclass fields and their `help` metadata) drives the argparse flags, the environment
names and the config-file keys, so the three sources cannot drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from kvserve.config import KV_CACHE_DTYPES, QUANTIZATIONS, SUPPORTED_DTYPES
from kvserve.entrypoints.openai.tool_parsers import TOOL_PARSER_NAMES

ENV_PREFIX = "KVSERVE_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _opt(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, "argparse": argparse_kwargs})


@dataclass(frozen=True)
class ServerConfig:
    model: Optional[str] = _opt(None, "HF model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    tokenizer: Optional[str] = _opt(None, "tokenizer folder or .gguf (default: the model's)")
    host: str = _opt("127.0.0.1", "address to listen on")
    port: int = _opt(8000, "port to listen on")
    api_key: Optional[str] = _opt(None, "require `Authorization: Bearer <key>` on every route but /health and /metrics")
    served_model_name: tuple[str, ...] = _opt((), "model name(s) clients use; the first is reported (default: MODEL)")
    dtype: str = _opt("auto", "compute dtype", choices=SUPPORTED_DTYPES)
    quantization: Optional[str] = _opt(
        None, "how weights are kept: gguf (a GGUF's blocks, the default for one), none (a GGUF dequantized at load), "
        "int8 / int4 (a float checkpoint's linears quantized at load), awq / gptq (the checkpoint's own int4)",
        choices=[q for q in QUANTIZATIONS if q],
    )
    max_model_len: Optional[int] = _opt(None, "context length, prompt + output (default: the model's)")
    max_num_seqs: int = _opt(256, "most sequences in one engine step")
    max_num_batched_tokens: Optional[int] = _opt(
        None, "token budget of one engine step (default: max(2048, max-num-seqs))"
    )
    max_num_batched_tokens_while_decoding: Optional[int] = _opt(
        None,
        "token budget of a step while requests decode: shorter steps, shorter waits for new requests "
        "(default: a quarter of the budget on a CPU, the whole budget on a GPU)",
    )
    block_size: int = _opt(16, "tokens per KV-cache block")
    enable_prefix_caching: bool = _opt(True, "reuse the KV cache of shared prompt prefixes")
    kv_cache_memory_bytes: Optional[int] = _opt(None, "KV-cache budget in bytes (default: a fraction of free memory)")
    kv_cache_dtype: str = _opt(
        "auto", "the KV cache's dtype (default: the activations'; bfloat16 under --dtype bfloat16 over GGUF "
        "blocks, whose activations stay float32)", choices=KV_CACHE_DTYPES,
    )
    device: str = _opt("auto", "where the model runs", choices=("auto", "cpu", "cuda"))
    enforce_eager: bool = _opt(False, "no CUDA graphs: decode steps run eagerly too (a CPU always does)")
    compilation_config: Optional[str] = _opt(
        None, "vLLM's compilation config, JSON: custom_ops (the GPU's fused Triton ops: \"all\" / \"none\", "
        "\"+op\" / \"-op\" for rms_norm, silu_and_mul, rotary_embedding; default all) and "
        "max_cudagraph_capture_size (default 256); other keys are ignored",
    )
    chat_template: Optional[str] = _opt(
        None, "Jinja chat template: a file path or the template itself (default: the model's)"
    )
    enable_auto_tool_choice: bool = _opt(
        False, 'tool_choice "auto" on /v1/chat/completions: calls read from the answer by --tool-call-parser'
    )
    tool_call_parser: Optional[str] = _opt(
        None, "how the model writes tool calls: hermes (Hermes, Qwen2.5/3, SmolLM2's <tool_call>), llama3_json, "
        "mistral, pythonic (Llama 3.2/4)", choices=TOOL_PARSER_NAMES,
    )  # fmt: skip
    seed: int = _opt(0, "engine seed")
    allowed_origins: tuple[str, ...] = _opt((), "CORS origins allowed to call the API, e.g. '*' (default: none)")
    max_queued_requests: int = _opt(1024, "requests allowed to wait for a batch slot; more get 503 + Retry-After")
    log_level: str = _opt("info", "log level", choices=LOG_LEVELS)
    log_stats_interval: float = _opt(5.0, "seconds between stats lines on stderr while busy (0: never)")
    shutdown_timeout: float = _opt(30.0, "on SIGTERM/SIGINT, seconds to let in-flight requests finish")

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}"),
            (self.max_queued_requests >= 0, f"max_queued_requests must be >= 0, got {self.max_queued_requests}"),
            (
                self.max_num_batched_tokens_while_decoding is None or self.max_num_batched_tokens_while_decoding >= 1,
                f"max_num_batched_tokens_while_decoding must be >= 1, got {self.max_num_batched_tokens_while_decoding}",
            ),
            (self.log_stats_interval >= 0, f"log_stats_interval must be >= 0, got {self.log_stats_interval}"),
            (self.shutdown_timeout >= 0, f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}"),
            (
                not self.enable_auto_tool_choice or self.tool_call_parser is not None,
                "enable_auto_tool_choice needs tool_call_parser: add --tool-call-parser "
                f"({' | '.join(TOOL_PARSER_NAMES)}), the format the model writes its calls in",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.compilation_config is not None:  # before anything starts, not when the engine loads
            try:
                self.engine_args().compilation()
            except ValueError as error:
                raise ConfigError(str(error)) from None

    @property
    def model_names(self) -> tuple[str, ...]:
        """Names a request's `model` may use; the first is the one responses report."""
        if self.served_model_name:
            return self.served_model_name
        return (self.model or "SmolLM2-135M-Instruct",)

    def resolved_chat_template(self) -> Optional[str]:
        """The template text: the file's contents if chat_template names a file, else the string itself."""
        if self.chat_template is None:
            return None
        path = Path(self.chat_template)
        if len(self.chat_template) < 4096 and path.is_file():
            return path.read_text()
        return self.chat_template

    def engine_args(self):
        from kvserve.engine.arg_utils import EngineArgs

        return EngineArgs(
            model=self.model, tokenizer=self.tokenizer, dtype=self.dtype, quantization=self.quantization, max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_batched_tokens_while_decoding=self.max_num_batched_tokens_while_decoding,
            block_size=self.block_size, enable_prefix_caching=self.enable_prefix_caching,
            kv_cache_memory_bytes=self.kv_cache_memory_bytes, kv_cache_dtype=self.kv_cache_dtype, seed=self.seed,
            device=self.device, enforce_eager=self.enforce_eager, compilation_config=self.compilation_config,
            serving=True,
        )  # fmt: skip


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the setting and its source."""


_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}
_TYPES = typing.get_type_hints(ServerConfig)


# -- the command line ------------------------------------------------------------------------------


def flag_help(name: str) -> str:
    """A setting's help text (the offline CLI shares it where a flag means the same for both)."""
    return _FIELDS[name].metadata["help"]


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The `kvserve serve` flags. Defaults are SUPPRESSed so that only flags given on the command line
    appear in the namespace, and override the file and the environment."""
    parser.add_argument("model", nargs="?", default=argparse.SUPPRESS, help=_FIELDS["model"].metadata["help"])
    parser.add_argument(
        "--config", default=None, metavar="FILE", help="YAML or JSON file of settings (keys are the flag names)"
    )
    for name, f in _FIELDS.items():
        flag = "--" + name.replace("_", "-")
        base, optional = _base_type(_TYPES[name])
        help_text = f.metadata["help"]
        if "(default:" not in help_text:  # the help names a default that depends on something else
            help_text += f" (default: {_show(f.default)})"
        help_text += f" [env {ENV_PREFIX}{name.upper()}]"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, **f.metadata["argparse"]}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif base is tuple:
            kwargs.update(nargs="+", metavar=name.upper())
        else:
            kwargs["type"] = base
        parser.add_argument(flag, **kwargs)


def build_server_config(args: argparse.Namespace, environ: Optional[Mapping[str, str]] = None) -> ServerConfig:
    """Merge defaults < config file < environment < command line into a frozen ServerConfig."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    values.update(_from_environ(environ))
    cli = {k: v for k, v in vars(args).items() if k in _FIELDS}
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in cli.items()})
    return ServerConfig(**values)


# -- the file and the environment ------------------------------------------------------------------


def load_config_file(path: str) -> dict[str, Any]:
    """Settings from a YAML or JSON mapping; keys are flag names with dashes or underscores."""
    text = Path(path).read_text()
    if path.endswith(".json"):
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of setting names to values, got {type(data).__name__}")
    values = {}
    for key, raw in data.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            raise ConfigError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(_FIELDS))}")
        values[name] = _convert(name, raw, f"{path}: {key}")
    return values


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for name in _FIELDS:
        env_name = ENV_PREFIX + name.upper()
        if env_name in environ:
            values[name] = _convert(name, environ[env_name], env_name)
    return values


def _convert(name: str, raw: Any, source: str) -> Any:
    """Coerce a file or environment value to the field's type; strings are parsed."""
    base, optional = _base_type(_TYPES[name])
    if raw is None or (optional and isinstance(raw, str) and raw.strip().lower() in ("", "none", "null")):
        if not optional:
            raise ConfigError(f"{source}: {name} cannot be empty")
        return None
    try:
        if base is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError("expected true/false, 1/0, yes/no or on/off")
            return text in ("1", "true", "yes", "on")
        if base is tuple:
            if isinstance(raw, str):
                raw = json.loads(raw) if raw.lstrip().startswith("[") else [s for s in raw.split(",") if s.strip()]
            if not isinstance(raw, (list, tuple)):
                raise ValueError("expected a list or a comma-separated string")
            return tuple(str(s).strip() for s in raw)
        if base in (int, float) and isinstance(raw, bool):
            raise ValueError("expected a number")
        if base is str and isinstance(raw, (dict, list)):  # a file's mapping for a JSON setting
            raw = json.dumps(raw)
        value = base(raw)
        if base is int and isinstance(raw, float) and raw != value:
            raise ValueError("expected an integer")
    except ValueError as e:
        raise ConfigError(f"{source}: invalid value {raw!r} for {name}: {e}") from None
    choices = _FIELDS[name].metadata["argparse"].get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{source}: {name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _base_type(tp: Any) -> tuple[type, bool]:
    """(int, True) for Optional[int]; (tuple, False) for tuple[str, ...]."""
    args = typing.get_args(tp)
    optional = type(None) in args
    if optional:
        tp = next(a for a in args if a is not type(None))
    origin = typing.get_origin(tp)
    return (origin or tp), optional


def _show(value: Any) -> str:
    if value in ((), None):
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).replace("%", "%%")
