"""Errors as clients see them: OpenAI's shape `{"error": {"message", "type", "param", "code"}}` on every
route, except TGI's routes, which answer in TGI's shape `{"error", "error_type"}`.

Handlers raise APIError (or let a ValueError from SamplingParams/validation become one through
`from_value_error`); the exception handlers installed here turn them, FastAPI's validation errors
(422 -> 400, with a message naming the field) and unexpected exceptions (500) into responses.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvserve.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          503: "service_unavailable_error"}  # fmt: skip
# SamplingParams' messages start with the offending field's name ("top_p must be in (0, 1], got 2.0.").
_PARAM_NAMES = {
    "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "max_tokens", "min_tokens", "logprobs", "prompt_logprobs", "stop", "stop_token_ids", "logit_bias", "seed",
    "top_logprobs", "max_completion_tokens", "max_new_tokens", "prompt", "messages", "structured_outputs",
    "response_format", "tools", "tool_choice", "truncate_prompt_tokens", "allowed_token_ids", "bad_words",
}  # fmt: skip


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: Optional[str] = None,
        code: Optional[str] = None,
        type: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    def info(self) -> ErrorInfo:
        return ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)


def bad_request(message: str, param: Optional[str] = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def from_value_error(error: Exception, code: str = "invalid_value") -> APIError:
    """A 400 from a validation ValueError; `param` is the field its message starts with, if any
    ("structured_outputs.json does not compile: ..." names structured_outputs.json)."""
    message = str(error)
    first = message.split(" ", 1)[0].rstrip(":")
    return APIError(400, message, param=first if first.split(".", 1)[0] in _PARAM_NAMES else None, code=code)


def model_not_found(name: str, served: Iterable[str]) -> APIError:
    names = ", ".join(served)
    return APIError(404, f"The model `{name}` does not exist. This server serves: {names}.", param="model",
                    code="model_not_found")  # fmt: skip


def service_unavailable(message: str, code: str, retry_after: int = 1) -> APIError:
    return APIError(503, message, code=code, headers={"Retry-After": str(retry_after)})


# --- rendering --------------------------------------------------------------------------------------


def openai_error_json(error: APIError) -> str:
    """The body of an error event inside a stream (the HTTP status was already sent)."""
    return ErrorResponse(error=error.info()).model_dump_json()


def render_error(path: str, error: APIError, tgi_paths: frozenset[str] = frozenset()) -> JSONResponse:
    if path in tgi_paths:
        # TGI's validation errors are 422 {"error", "error_type": "validation"}.
        status = 422 if error.status == 400 else error.status
        kind = "validation" if error.status in (400, 404) else error.type
        return JSONResponse({"error": error.message, "error_type": kind}, status, headers=error.headers)
    return JSONResponse(ErrorResponse(error=error.info()).model_dump(), error.status, headers=error.headers)


def install_error_handlers(app: FastAPI, tgi_paths: frozenset[str]) -> None:
    def render(request: Request, error: APIError) -> JSONResponse:
        return render_error(request.url.path, error, tgi_paths)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return render(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_errors(exc.errors())
        return render(request, APIError(400, message, param=param, code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return render(request, APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("Unexpected error answering %s", request.url.path)
        return render(request, APIError(500, f"Internal server error: {exc!r}", code="internal_error"))


def describe_validation_errors(errors: list[dict[str, Any]]) -> tuple[str, Optional[str]]:
    """One message for pydantic's errors, naming each field and what it should be. Errors from the
    branches of one union field (prompt: str | list[str] | ...) are merged into one line."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for error in errors:
        if error["type"] == "json_invalid":
            reason = error.get("ctx", {}).get("error", "invalid JSON")
            return f"The request body is not valid JSON ({reason}); send a JSON object.", None
        path, _ = _split_loc(error["loc"])
        groups.setdefault(path, []).append(error)
    lines = []
    for path, group in groups.items():
        if path == "" and group[0]["type"] == "missing":
            lines.append("The request body is missing; send a JSON object.")
        elif group[0]["type"] == "extra_forbidden":
            lines.append(f"Unrecognized request argument supplied: {path}")
        elif len(group) > 1:
            expected = [_split_loc(e["loc"])[1] or e["type"] for e in group]
            lines.append(f"{path}: {_show(group[0].get('input'))} is not valid; expected {' or '.join(expected)}")
        else:
            got = group[0].get("input")
            suffix = f" (got {_show(got)})" if group[0]["type"] != "missing" else ""
            lines.append(f"{path or 'body'}: {group[0]['msg']}{suffix}")
    first = next(iter(groups), None)
    return "; ".join(lines[:5]), (first or None)


def _split_loc(loc: tuple) -> tuple[str, str]:
    """("body", "messages", 0, "content", "list[TextPart]", 0, "type") -> ("messages.0.content.0.type",
    "list[TextPart]"): the field path, and the union branch pydantic tried (if any)."""
    parts, branch = [], ""
    for item in loc[1:] if loc and loc[0] == "body" else loc:
        text = str(item)
        if isinstance(item, str) and ("[" in text or text[:1].isupper() or text in _TYPE_TAGS):
            branch = branch or text
            continue
        parts.append(text)
    return ".".join(parts), branch


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict", "nullable", "function-after"}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
