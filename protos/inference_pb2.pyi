from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OutputSelection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_LAST: _ClassVar[OutputSelection]
    OUTPUT_ALL: _ClassVar[OutputSelection]
    OUTPUT_TOP_K: _ClassVar[OutputSelection]
    OUTPUT_NONE: _ClassVar[OutputSelection]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_NONE: _ClassVar[FinishReason]
    FINISH_MAX_TOKENS: _ClassVar[FinishReason]
    FINISH_STOP_TOKEN: _ClassVar[FinishReason]
OUTPUT_LAST: OutputSelection
OUTPUT_ALL: OutputSelection
OUTPUT_TOP_K: OutputSelection
OUTPUT_NONE: OutputSelection
FINISH_NONE: FinishReason
FINISH_MAX_TOKENS: FinishReason
FINISH_STOP_TOKEN: FinishReason

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_sessions", "max_sessions_per_principal", "max_tokens_per_request", "max_message_bytes", "session_ttl_seconds", "max_batch", "max_batch_delay_ms", "max_new_tokens", "rewind_window", "checkpoint_bytes_per_session", "prefix_cache_bytes", "prefix_cache_scope")
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_PER_PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REWIND_WINDOW_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_BYTES_PER_SESSION_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_SCOPE_FIELD_NUMBER: _ClassVar[int]
    max_sessions: int
    max_sessions_per_principal: int
    max_tokens_per_request: int
    max_message_bytes: int
    session_ttl_seconds: float
    max_batch: int
    max_batch_delay_ms: float
    max_new_tokens: int
    rewind_window: int
    checkpoint_bytes_per_session: int
    prefix_cache_bytes: int
    prefix_cache_scope: str
    def __init__(self, max_sessions: _Optional[int] = ..., max_sessions_per_principal: _Optional[int] = ..., max_tokens_per_request: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., session_ttl_seconds: _Optional[float] = ..., max_batch: _Optional[int] = ..., max_batch_delay_ms: _Optional[float] = ..., max_new_tokens: _Optional[int] = ..., rewind_window: _Optional[int] = ..., checkpoint_bytes_per_session: _Optional[int] = ..., prefix_cache_bytes: _Optional[int] = ..., prefix_cache_scope: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "input_kind", "vocab_size", "d_input", "d_output", "state_size", "state_bytes", "dtype", "provider", "step_sha256", "prefill_sha256", "limits", "server_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_KIND_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    D_INPUT_FIELD_NUMBER: _ClassVar[int]
    D_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    STATE_SIZE_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    STEP_SHA256_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SHA256_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    input_kind: str
    vocab_size: int
    d_input: int
    d_output: int
    state_size: int
    state_bytes: int
    dtype: str
    provider: str
    step_sha256: str
    prefill_sha256: str
    limits: Limits
    server_version: str
    def __init__(self, name: _Optional[str] = ..., input_kind: _Optional[str] = ..., vocab_size: _Optional[int] = ..., d_input: _Optional[int] = ..., d_output: _Optional[int] = ..., state_size: _Optional[int] = ..., state_bytes: _Optional[int] = ..., dtype: _Optional[str] = ..., provider: _Optional[str] = ..., step_sha256: _Optional[str] = ..., prefill_sha256: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., server_version: _Optional[str] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("session_id", "ttl_seconds", "snapshot", "prompt")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    ttl_seconds: float
    snapshot: bytes
    prompt: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., ttl_seconds: _Optional[float] = ..., snapshot: _Optional[bytes] = ..., prompt: _Optional[_Iterable[int]] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "position", "ttl_seconds", "cached_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    position: int
    ttl_seconds: float
    cached_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., position: _Optional[int] = ..., ttl_seconds: _Optional[float] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class RewindRequest(_message.Message):
    __slots__ = ("session_id", "position")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    position: int
    def __init__(self, session_id: _Optional[str] = ..., position: _Optional[int] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "tokens", "values", "output", "top_k")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    output: OutputSelection
    top_k: int
    def __init__(self, session_id: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., output: _Optional[_Union[OutputSelection, str]] = ..., top_k: _Optional[int] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("session_id", "position", "outputs", "rows", "cols", "top_tokens", "top_logprobs")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    position: int
    outputs: _containers.RepeatedScalarFieldContainer[float]
    rows: int
    cols: int
    top_tokens: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, session_id: _Optional[str] = ..., position: _Optional[int] = ..., outputs: _Optional[_Iterable[float]] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ..., top_tokens: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_tokens", "keep_session")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEEP_SESSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_tokens: _containers.RepeatedScalarFieldContainer[int]
    keep_session: bool
    def __init__(self, session_id: _Optional[str] = ..., prompt: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_tokens: _Optional[_Iterable[int]] = ..., keep_session: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("session_id", "token", "logprob", "position", "index", "finish_reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    token: int
    logprob: float
    position: int
    index: int
    finish_reason: FinishReason
    def __init__(self, session_id: _Optional[str] = ..., token: _Optional[int] = ..., logprob: _Optional[float] = ..., position: _Optional[int] = ..., index: _Optional[int] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ...) -> None: ...

class SnapshotRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("session_id", "position", "model_sha256", "data")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    position: int
    model_sha256: str
    data: bytes
    def __init__(self, session_id: _Optional[str] = ..., position: _Optional[int] = ..., model_sha256: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("snapshot", "session_id", "ttl_seconds")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    snapshot: bytes
    session_id: str
    ttl_seconds: float
    def __init__(self, snapshot: _Optional[bytes] = ..., session_id: _Optional[str] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class ForkRequest(_message.Message):
    __slots__ = ("session_id", "new_session_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    new_session_id: str
    def __init__(self, session_id: _Optional[str] = ..., new_session_id: _Optional[str] = ...) -> None: ...
