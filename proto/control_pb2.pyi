from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_PREPARING: _ClassVar[RunState]
    RUN_STATE_READY: _ClassVar[RunState]
    RUN_STATE_SERVING: _ClassVar[RunState]
    RUN_STATE_CONNECTED: _ClassVar[RunState]
    RUN_STATE_TRAINING: _ClassVar[RunState]
    RUN_STATE_FAILED: _ClassVar[RunState]
    RUN_STATE_STOPPED: _ClassVar[RunState]

class CommandState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMAND_STATE_UNSPECIFIED: _ClassVar[CommandState]
    COMMAND_STATE_ACCEPTED: _ClassVar[CommandState]
    COMMAND_STATE_DONE: _ClassVar[CommandState]
    COMMAND_STATE_FAILED: _ClassVar[CommandState]
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_PREPARING: RunState
RUN_STATE_READY: RunState
RUN_STATE_SERVING: RunState
RUN_STATE_CONNECTED: RunState
RUN_STATE_TRAINING: RunState
RUN_STATE_FAILED: RunState
RUN_STATE_STOPPED: RunState
COMMAND_STATE_UNSPECIFIED: CommandState
COMMAND_STATE_ACCEPTED: CommandState
COMMAND_STATE_DONE: CommandState
COMMAND_STATE_FAILED: CommandState

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeviceProfile(_message.Message):
    __slots__ = ("flops_per_s", "memory_bytes", "gpu_memory_bytes", "device", "accelerator", "upload_bytes_per_s", "download_bytes_per_s", "rtt_s", "capacity", "declared", "flops_method", "max_micro_batch")
    FLOPS_PER_S_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    RTT_S_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    DECLARED_FIELD_NUMBER: _ClassVar[int]
    FLOPS_METHOD_FIELD_NUMBER: _ClassVar[int]
    MAX_MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    flops_per_s: float
    memory_bytes: int
    gpu_memory_bytes: int
    device: str
    accelerator: str
    upload_bytes_per_s: float
    download_bytes_per_s: float
    rtt_s: float
    capacity: int
    declared: _containers.RepeatedScalarFieldContainer[str]
    flops_method: str
    max_micro_batch: int
    def __init__(self, flops_per_s: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., gpu_memory_bytes: _Optional[int] = ..., device: _Optional[str] = ..., accelerator: _Optional[str] = ..., upload_bytes_per_s: _Optional[float] = ..., download_bytes_per_s: _Optional[float] = ..., rtt_s: _Optional[float] = ..., capacity: _Optional[int] = ..., declared: _Optional[_Iterable[str]] = ..., flops_method: _Optional[str] = ..., max_micro_batch: _Optional[int] = ...) -> None: ...

class ClientInfo(_message.Message):
    __slots__ = ("version", "hostname", "platform", "has_data", "data_bytes", "bridge_host")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    HAS_DATA_FIELD_NUMBER: _ClassVar[int]
    DATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_HOST_FIELD_NUMBER: _ClassVar[int]
    version: str
    hostname: str
    platform: str
    has_data: bool
    data_bytes: int
    bridge_host: str
    def __init__(self, version: _Optional[str] = ..., hostname: _Optional[str] = ..., platform: _Optional[str] = ..., has_data: _Optional[bool] = ..., data_bytes: _Optional[int] = ..., bridge_host: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("name", "join_token", "client_key", "info", "profile", "protocol_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLIENT_KEY_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    join_token: str
    client_key: str
    info: ClientInfo
    profile: DeviceProfile
    protocol_version: int
    def __init__(self, name: _Optional[str] = ..., join_token: _Optional[str] = ..., client_key: _Optional[str] = ..., info: _Optional[_Union[ClientInfo, _Mapping]] = ..., profile: _Optional[_Union[DeviceProfile, _Mapping]] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("client_id", "session_token", "heartbeat_interval_s", "heartbeat_timeout_s", "max_chunk_bytes", "probe_max_seconds")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROBE_MAX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    session_token: str
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    max_chunk_bytes: int
    probe_max_seconds: float
    def __init__(self, client_id: _Optional[str] = ..., session_token: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ..., heartbeat_timeout_s: _Optional[float] = ..., max_chunk_bytes: _Optional[int] = ..., probe_max_seconds: _Optional[float] = ...) -> None: ...

class ProfileReport(_message.Message):
    __slots__ = ("profile",)
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    profile: DeviceProfile
    def __init__(self, profile: _Optional[_Union[DeviceProfile, _Mapping]] = ...) -> None: ...

class RunStatus(_message.Message):
    __slots__ = ("run_id", "partitions", "state", "bridge_url", "message", "bridge_cert_pem")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_URL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    partitions: _containers.RepeatedScalarFieldContainer[int]
    state: RunState
    bridge_url: str
    message: str
    bridge_cert_pem: str
    def __init__(self, run_id: _Optional[str] = ..., partitions: _Optional[_Iterable[int]] = ..., state: _Optional[_Union[RunState, str]] = ..., bridge_url: _Optional[str] = ..., message: _Optional[str] = ..., bridge_cert_pem: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("runs", "free_memory_bytes")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    FREE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunStatus]
    free_memory_bytes: int
    def __init__(self, runs: _Optional[_Iterable[_Union[RunStatus, _Mapping]]] = ..., free_memory_bytes: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("heartbeat_interval_s",)
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    def __init__(self, heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class CommandsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PartitionAssignment(_message.Message):
    __slots__ = ("index", "num_stages", "layer_start", "layer_end", "weights_sha256", "weights_bytes", "local")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    index: int
    num_stages: int
    layer_start: int
    layer_end: int
    weights_sha256: str
    weights_bytes: int
    local: bool
    def __init__(self, index: _Optional[int] = ..., num_stages: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., weights_sha256: _Optional[str] = ..., weights_bytes: _Optional[int] = ..., local: _Optional[bool] = ...) -> None: ...

class AllowedPeer(_message.Message):
    __slots__ = ("client_id", "token_sha256")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_SHA256_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    token_sha256: str
    def __init__(self, client_id: _Optional[str] = ..., token_sha256: _Optional[str] = ...) -> None: ...

class HostRun(_message.Message):
    __slots__ = ("run_id", "model_config", "partitions", "allowed_peers")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_PEERS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    model_config: bytes
    partitions: _containers.RepeatedCompositeFieldContainer[PartitionAssignment]
    allowed_peers: _containers.RepeatedCompositeFieldContainer[AllowedPeer]
    def __init__(self, run_id: _Optional[str] = ..., model_config: _Optional[bytes] = ..., partitions: _Optional[_Iterable[_Union[PartitionAssignment, _Mapping]]] = ..., allowed_peers: _Optional[_Iterable[_Union[AllowedPeer, _Mapping]]] = ...) -> None: ...

class PeerEndpoint(_message.Message):
    __slots__ = ("partition", "client_id", "url", "token", "cert_pem")
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    partition: int
    client_id: str
    url: str
    token: str
    cert_pem: str
    def __init__(self, partition: _Optional[int] = ..., client_id: _Optional[str] = ..., url: _Optional[str] = ..., token: _Optional[str] = ..., cert_pem: _Optional[str] = ...) -> None: ...

class ConnectPeers(_message.Message):
    __slots__ = ("run_id", "peers")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    peers: _containers.RepeatedCompositeFieldContainer[PeerEndpoint]
    def __init__(self, run_id: _Optional[str] = ..., peers: _Optional[_Iterable[_Union[PeerEndpoint, _Mapping]]] = ...) -> None: ...

class ChainPeers(_message.Message):
    __slots__ = ("run_id", "peers")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    peers: _containers.RepeatedCompositeFieldContainer[PeerEndpoint]
    def __init__(self, run_id: _Optional[str] = ..., peers: _Optional[_Iterable[_Union[PeerEndpoint, _Mapping]]] = ...) -> None: ...

class Train(_message.Message):
    __slots__ = ("run_id", "round", "steps", "start", "batch_size", "seq_len", "micro_batches", "lr", "seed", "val_fraction", "eval_batch_size", "tokenizer", "method", "schedule", "warmup_steps", "total_steps", "min_lr", "clip_norm", "time_budget_s")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    VAL_FRACTION_FIELD_NUMBER: _ClassVar[int]
    EVAL_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    TIME_BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    steps: int
    start: int
    batch_size: int
    seq_len: int
    micro_batches: int
    lr: float
    seed: int
    val_fraction: float
    eval_batch_size: int
    tokenizer: str
    method: str
    schedule: str
    warmup_steps: int
    total_steps: int
    min_lr: float
    clip_norm: float
    time_budget_s: float
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., steps: _Optional[int] = ..., start: _Optional[int] = ..., batch_size: _Optional[int] = ..., seq_len: _Optional[int] = ..., micro_batches: _Optional[int] = ..., lr: _Optional[float] = ..., seed: _Optional[int] = ..., val_fraction: _Optional[float] = ..., eval_batch_size: _Optional[int] = ..., tokenizer: _Optional[str] = ..., method: _Optional[str] = ..., schedule: _Optional[str] = ..., warmup_steps: _Optional[int] = ..., total_steps: _Optional[int] = ..., min_lr: _Optional[float] = ..., clip_norm: _Optional[float] = ..., time_budget_s: _Optional[float] = ...) -> None: ...

class Upload(_message.Message):
    __slots__ = ("run_id", "partitions", "round", "density", "optimizer_state")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STATE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    partitions: _containers.RepeatedScalarFieldContainer[int]
    round: int
    density: float
    optimizer_state: bool
    def __init__(self, run_id: _Optional[str] = ..., partitions: _Optional[_Iterable[int]] = ..., round: _Optional[int] = ..., density: _Optional[float] = ..., optimizer_state: _Optional[bool] = ...) -> None: ...

class StopRun(_message.Message):
    __slots__ = ("run_id", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LoraSettings(_message.Message):
    __slots__ = ("r", "alpha", "targets")
    R_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    r: int
    alpha: int
    targets: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, r: _Optional[int] = ..., alpha: _Optional[int] = ..., targets: _Optional[_Iterable[str]] = ...) -> None: ...

class HeadSettings(_message.Message):
    __slots__ = ("fraction", "choice", "adapter", "key", "schedule")
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    fraction: float
    choice: str
    adapter: str
    key: str
    schedule: str
    def __init__(self, fraction: _Optional[float] = ..., choice: _Optional[str] = ..., adapter: _Optional[str] = ..., key: _Optional[str] = ..., schedule: _Optional[str] = ...) -> None: ...

class CodecSettings(_message.Message):
    __slots__ = ("name", "values", "scope", "error_feedback")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: str
    scope: str
    error_feedback: bool
    def __init__(self, name: _Optional[str] = ..., values: _Optional[str] = ..., scope: _Optional[str] = ..., error_feedback: _Optional[bool] = ...) -> None: ...

class PrepareRun(_message.Message):
    __slots__ = ("run_id", "finetune", "optimizer", "lora", "seed", "codec", "method", "method_options", "heads", "path", "activation_compression")
    class MethodOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    FINETUNE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    METHOD_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    finetune: str
    optimizer: str
    lora: LoraSettings
    seed: int
    codec: CodecSettings
    method: str
    method_options: _containers.ScalarMap[str, str]
    heads: HeadSettings
    path: str
    activation_compression: str
    def __init__(self, run_id: _Optional[str] = ..., finetune: _Optional[str] = ..., optimizer: _Optional[str] = ..., lora: _Optional[_Union[LoraSettings, _Mapping]] = ..., seed: _Optional[int] = ..., codec: _Optional[_Union[CodecSettings, _Mapping]] = ..., method: _Optional[str] = ..., method_options: _Optional[_Mapping[str, str]] = ..., heads: _Optional[_Union[HeadSettings, _Mapping]] = ..., path: _Optional[str] = ..., activation_compression: _Optional[str] = ...) -> None: ...

class LoadPartitions(_message.Message):
    __slots__ = ("run_id", "partitions", "round")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    partitions: _containers.RepeatedCompositeFieldContainer[PartitionAssignment]
    round: int
    def __init__(self, run_id: _Optional[str] = ..., partitions: _Optional[_Iterable[_Union[PartitionAssignment, _Mapping]]] = ..., round: _Optional[int] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("command_id", "host", "connect", "train", "upload", "stop", "prepare", "load", "chain")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    CONNECT_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    PREPARE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    command_id: int
    host: HostRun
    connect: ConnectPeers
    train: Train
    upload: Upload
    stop: StopRun
    prepare: PrepareRun
    load: LoadPartitions
    chain: ChainPeers
    def __init__(self, command_id: _Optional[int] = ..., host: _Optional[_Union[HostRun, _Mapping]] = ..., connect: _Optional[_Union[ConnectPeers, _Mapping]] = ..., train: _Optional[_Union[Train, _Mapping]] = ..., upload: _Optional[_Union[Upload, _Mapping]] = ..., stop: _Optional[_Union[StopRun, _Mapping]] = ..., prepare: _Optional[_Union[PrepareRun, _Mapping]] = ..., load: _Optional[_Union[LoadPartitions, _Mapping]] = ..., chain: _Optional[_Union[ChainPeers, _Mapping]] = ...) -> None: ...

class PeerBytes(_message.Message):
    __slots__ = ("stage", "sent", "received")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    stage: int
    sent: int
    received: int
    def __init__(self, stage: _Optional[int] = ..., sent: _Optional[int] = ..., received: _Optional[int] = ...) -> None: ...

class StepRecord(_message.Message):
    __slots__ = ("loss", "tokens", "seconds", "peers", "lr", "grad_norm", "output_norm")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NORM_FIELD_NUMBER: _ClassVar[int]
    loss: float
    tokens: int
    seconds: float
    peers: _containers.RepeatedCompositeFieldContainer[PeerBytes]
    lr: float
    grad_norm: float
    output_norm: float
    def __init__(self, loss: _Optional[float] = ..., tokens: _Optional[int] = ..., seconds: _Optional[float] = ..., peers: _Optional[_Iterable[_Union[PeerBytes, _Mapping]]] = ..., lr: _Optional[float] = ..., grad_norm: _Optional[float] = ..., output_norm: _Optional[float] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("loss", "perplexity", "tokens")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    loss: float
    perplexity: float
    tokens: int
    def __init__(self, loss: _Optional[float] = ..., perplexity: _Optional[float] = ..., tokens: _Optional[int] = ...) -> None: ...

class RoundReport(_message.Message):
    __slots__ = ("round", "steps", "evaluation", "samples", "data_samples", "seconds", "stage_seconds", "step_seconds")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DATA_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    round: int
    steps: _containers.RepeatedCompositeFieldContainer[StepRecord]
    evaluation: Evaluation
    samples: int
    data_samples: int
    seconds: float
    stage_seconds: _containers.RepeatedScalarFieldContainer[float]
    step_seconds: float
    def __init__(self, round: _Optional[int] = ..., steps: _Optional[_Iterable[_Union[StepRecord, _Mapping]]] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ..., samples: _Optional[int] = ..., data_samples: _Optional[int] = ..., seconds: _Optional[float] = ..., stage_seconds: _Optional[_Iterable[float]] = ..., step_seconds: _Optional[float] = ...) -> None: ...

class RoundProgress(_message.Message):
    __slots__ = ("round", "first_step", "losses", "steps", "tokens", "seconds")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    round: int
    first_step: int
    losses: _containers.RepeatedScalarFieldContainer[float]
    steps: int
    tokens: int
    seconds: float
    def __init__(self, round: _Optional[int] = ..., first_step: _Optional[int] = ..., losses: _Optional[_Iterable[float]] = ..., steps: _Optional[int] = ..., tokens: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class StatusReport(_message.Message):
    __slots__ = ("command_id", "state", "message", "run", "round_report", "progress", "lost_peer")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    ROUND_REPORT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LOST_PEER_FIELD_NUMBER: _ClassVar[int]
    command_id: int
    state: CommandState
    message: str
    run: RunStatus
    round_report: RoundReport
    progress: RoundProgress
    lost_peer: str
    def __init__(self, command_id: _Optional[int] = ..., state: _Optional[_Union[CommandState, str]] = ..., message: _Optional[str] = ..., run: _Optional[_Union[RunStatus, _Mapping]] = ..., round_report: _Optional[_Union[RoundReport, _Mapping]] = ..., progress: _Optional[_Union[RoundProgress, _Mapping]] = ..., lost_peer: _Optional[str] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    def __init__(self, nonce: _Optional[int] = ...) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    def __init__(self, nonce: _Optional[int] = ...) -> None: ...

class ProbeChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("seconds", "chunk_bytes")
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    seconds: float
    chunk_bytes: int
    def __init__(self, seconds: _Optional[float] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class ProbeResult(_message.Message):
    __slots__ = ("bytes", "seconds")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    seconds: float
    def __init__(self, bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class PartitionRequest(_message.Message):
    __slots__ = ("run_id", "partition")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    partition: int
    def __init__(self, run_id: _Optional[str] = ..., partition: _Optional[int] = ...) -> None: ...

class WeightHeader(_message.Message):
    __slots__ = ("run_id", "partition", "total_bytes", "sha256", "round", "num_samples", "slices")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    partition: int
    total_bytes: int
    sha256: str
    round: int
    num_samples: int
    slices: _containers.RepeatedCompositeFieldContainer[TrainedSlices]
    def __init__(self, run_id: _Optional[str] = ..., partition: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., round: _Optional[int] = ..., num_samples: _Optional[int] = ..., slices: _Optional[_Iterable[_Union[TrainedSlices, _Mapping]]] = ...) -> None: ...

class TrainedSlices(_message.Message):
    __slots__ = ("tensor", "dim", "width", "blocks")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    dim: int
    width: int
    blocks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, tensor: _Optional[str] = ..., dim: _Optional[int] = ..., width: _Optional[int] = ..., blocks: _Optional[_Iterable[int]] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: WeightHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[WeightHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("sha256", "total_bytes")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    total_bytes: int
    def __init__(self, sha256: _Optional[str] = ..., total_bytes: _Optional[int] = ...) -> None: ...
