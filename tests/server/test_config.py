"""`kvserve serve` settings: defaults < config file < KVSERVE_* environment < command line; bad values
name their source; the help texts stand on their own. No server is started here."""
from __future__ import annotations

import argparse
import json

import pytest

from kvserve.cli import main
from kvserve.server_config import ConfigError, ServerConfig, add_serve_args, build_server_config


def parse(argv: list[str], environ: dict[str, str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    return build_server_config(parser.parse_args(argv), environ or {})


def test_defaults_match_vllm():
    config = parse([])
    assert (config.host, config.port, config.api_key, config.model) == ("127.0.0.1", 8000, None, None)
    assert config.enable_prefix_caching and config.max_num_seqs == 256 and config.allowed_origins == ()


def test_command_line_beats_environment_beats_file(tmp_path):
    file = tmp_path / "serve.yaml"
    file.write_text("port: 1111\nmax-num-seqs: 4\nhost: 0.0.0.0\nenable_prefix_caching: false\n")
    env = {"KVSERVE_PORT": "2222", "KVSERVE_MAX_NUM_SEQS": "8", "KVSERVE_ALLOWED_ORIGINS": "http://a, http://b"}
    config = parse(["--config", str(file), "--port", "3333", "my-model"], env)
    assert config.port == 3333  # command line
    assert config.max_num_seqs == 8  # environment over the file
    assert config.host == "0.0.0.0" and config.enable_prefix_caching is False  # file over the defaults
    assert config.allowed_origins == ("http://a", "http://b")
    assert config.model == "my-model"
    flag_wins = parse(["--no-enable-prefix-caching"], {"KVSERVE_ENABLE_PREFIX_CACHING": "true"})
    assert flag_wins.enable_prefix_caching is False


def test_json_config_file_and_engine_args(tmp_path):
    file = tmp_path / "serve.json"
    file.write_text(json.dumps({"max_model_len": 1024, "served-model-name": ["a", "b"], "block_size": 32}))
    config = parse(["--config", str(file)])
    assert config.model_names == ("a", "b")
    args = config.engine_args()
    assert (args.max_model_len, args.block_size, args.enable_prefix_caching) == (1024, 32, True)
    assert args.max_num_batched_tokens_while_decoding is None  # resolved per device by EngineArgs
    assert args.serving  # ... as for a server: a quarter of the budget on a CPU
    short = parse(["--max-num-batched-tokens-while-decoding", "512"]).engine_args()
    assert short.max_num_batched_tokens_while_decoding == 512
    assert args.kv_cache_dtype == "auto"
    assert parse(["--kv-cache-dtype", "bfloat16"]).engine_args().kv_cache_dtype == "bfloat16"


@pytest.mark.parametrize(
    "environ,file_text,words",
    [({"KVSERVE_PORT": "eighty"}, None, ["KVSERVE_PORT", "port"]),
     ({"KVSERVE_ENABLE_PREFIX_CACHING": "maybe"}, None, ["KVSERVE_ENABLE_PREFIX_CACHING", "true/false"]),
     ({"KVSERVE_DTYPE": "int3"}, None, ["dtype must be one of"]),
     ({"KVSERVE_KV_CACHE_DTYPE": "fp8"}, None, ["kv_cache_dtype must be one of"]),
     ({"KVSERVE_PORT": "70000"}, None, ["port must be in"]),
     ({"KVSERVE_MAX_NUM_BATCHED_TOKENS_WHILE_DECODING": "0"}, None, ["max_num_batched_tokens_while_decoding", ">= 1"]),
     ({}, "max-num-seq: 4\n", ["unknown setting", "max-num-seq"]),
     ({}, "- a list\n", ["expected a mapping"])],
)  # fmt: skip
def test_bad_settings_name_their_source(tmp_path, environ, file_text, words):
    argv = []
    if file_text is not None:
        (tmp_path / "bad.yaml").write_text(file_text)
        argv = ["--config", str(tmp_path / "bad.yaml")]
    with pytest.raises(ConfigError) as info:
        parse(argv, environ)
    for word in words:
        assert word in str(info.value)


def test_help_texts(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "serve" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in ("--host", "--port", "--api-key", "--served-model-name", "--dtype", "--max-model-len",
                 "--max-num-seqs", "--max-num-batched-tokens", "--block-size", "--no-enable-prefix-caching",
                 "--chat-template", "--seed", "--allowed-origins", "--max-queued-requests", "--log-level",
                 "--config", "KVSERVE_MAX_NUM_SEQS"):  # fmt: skip
        assert flag in text, flag


def test_bad_flag_value_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", "-5"])
    assert info.value.code == 2 and "port must be in" in capsys.readouterr().err


def test_tool_calling_flags_follow_the_same_precedence(tmp_path):
    file = tmp_path / "serve.yaml"
    file.write_text("enable-auto-tool-choice: true\ntool-call-parser: llama3_json\n")
    from_file = parse(["--config", str(file)])
    assert from_file.enable_auto_tool_choice and from_file.tool_call_parser == "llama3_json"
    env = {"KVSERVE_TOOL_CALL_PARSER": "pythonic"}
    assert parse(["--config", str(file)], env).tool_call_parser == "pythonic"  # environment over the file
    config = parse(["--config", str(file), "--tool-call-parser", "hermes", "--no-enable-auto-tool-choice"], env)
    assert config.tool_call_parser == "hermes" and not config.enable_auto_tool_choice  # command line over both
    assert parse([]).enable_auto_tool_choice is False and parse([]).tool_call_parser is None
    with pytest.raises(ConfigError, match=r"needs tool_call_parser: add --tool-call-parser \(hermes \| llama3_json"):
        parse(["--enable-auto-tool-choice"])
    with pytest.raises(ConfigError, match="KVSERVE_TOOL_CALL_PARSER: tool_call_parser must be one of hermes, "):
        parse([], {"KVSERVE_TOOL_CALL_PARSER": "qwen"})
    with pytest.raises(SystemExit):
        parse(["--tool-call-parser", "qwen"])  # argparse: invalid choice


def test_enforce_eager_follows_the_same_precedence(tmp_path):
    file = tmp_path / "serve.yaml"
    file.write_text("enforce-eager: true\n")
    assert parse([]).enforce_eager is False and parse([]).engine_args().enforce_eager is False
    assert parse(["--config", str(file)]).engine_args().enforce_eager is True  # the file over the default
    assert parse(["--config", str(file)], {"KVSERVE_ENFORCE_EAGER": "0"}).enforce_eager is False  # env over file
    assert parse(["--enforce-eager"], {"KVSERVE_ENFORCE_EAGER": "false"}).enforce_eager is True  # flag over env
    assert parse(["--no-enforce-eager"], {"KVSERVE_ENFORCE_EAGER": "1"}).enforce_eager is False


def test_compilation_config_follows_the_same_precedence(tmp_path):
    """vLLM's --compilation-config: JSON text on the command line or in the environment, a mapping
    (or JSON text) in the file; a bad one is a ConfigError before anything starts."""
    file = tmp_path / "serve.yaml"
    file.write_text("compilation-config:\n  custom_ops: [none, +rms_norm]\n  max_cudagraph_capture_size: 32\n")
    compilation = parse(["--config", str(file)]).engine_args().compilation()
    assert (compilation.custom_ops, compilation.max_cudagraph_capture_size) == (("none", "+rms_norm"), 32)
    env = {"KVSERVE_COMPILATION_CONFIG": '{"custom_ops": ["-silu_and_mul"]}'}
    assert parse(["--config", str(file)], env).engine_args().compilation().custom_ops == ("-silu_and_mul",)
    flag = ["--compilation-config", '{"custom_ops": ["all"]}']
    assert parse(["--config", str(file), *flag], env).engine_args().compilation().custom_ops == ("all",)
    assert parse([]).engine_args().compilation().custom_ops == ("all",)
    with pytest.raises(ConfigError, match="custom_ops entry 'rms' is not understood"):
        parse(["--compilation-config", '{"custom_ops": ["rms"]}'])
    with pytest.raises(ConfigError, match="compilation_config is not JSON"):
        parse([], {"KVSERVE_COMPILATION_CONFIG": "{custom_ops"})
