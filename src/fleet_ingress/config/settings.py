"""Configuration: a TOML file, overridden by FLEET_INGRESS_<SECTION>__<KEY> variables.

Every problem is reported at once, each as `<file> line <N>: <section.key>: <problem>`
(`<file>: <section.key>: <problem>` where no line of the file holds the key), so an
operator fixes a broken file in one pass rather than one error per reload attempt.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import json
import math
import os
import re
import stat
import tomllib
import types
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.exceptions import SettingsError

from fleet_ingress.config.cpus import usable_cpus
from fleet_ingress.config.key_lines import key_line
from fleet_ingress.config.read_hints import PERMISSION_DENIED
from fleet_ingress.config.unix_socket import not_a_socket
from fleet_ingress.core.addresses import parse_hostport
from fleet_ingress.core.fleet_spec import MAX_MAXCONN

ENV_PREFIX = "FLEET_INGRESS_"
RETRY_WORDS = ("conn-failure", "empty-response", "junk-response", "response-timeout")
# sun_path holds 108 bytes including the terminating NUL.
_MAX_UNIX_PATH = 107
_WILDCARDS = frozenset({"0.0.0.0", "::"})


class ConfigError(Exception):
    """An unusable configuration; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _address(value: str) -> str:
    parse_hostport(value, what="address")
    return value


def _optional_address(value: str) -> str:
    return value and _address(value)


Address = Annotated[str, AfterValidator(_address)]
OptionalAddress = Annotated[str, AfterValidator(_optional_address)]  # "" disables
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
OffOrSeconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]  # 0 turns it off
# The kernel counts keepalive times in whole seconds, 1 to 32767.
KeepaliveSeconds = Annotated[float, Field(ge=0, le=32767, allow_inf_nan=False)]
# TCP_USER_TIMEOUT is a C int of milliseconds: above this, setsockopt raises
# TypeError at every accept and fleet connection (0 leaves the kernel's default).
MAX_USER_TIMEOUT = (2**31 - 1) // 1000
UserTimeoutSeconds = Annotated[float, Field(ge=0, le=MAX_USER_TIMEOUT, allow_inf_nan=False)]
# Bounds past anything a real host could want: a value above one is a typo's
# extra zeros, refused at check, start, reload and add-fleet alike (the bounds
# audit of session 35; before, process.workers = 100000 was taken, to be forked).
# A fleet's calls (fleets.maxconn, the fleets file's maxconn=): MAX_MAXCONN.
# Per worker: a call holds two descriptors, and the kernel's default fs.nr_open
# (1048576) holds one process to half this many calls; one event loop never
# carries a million.
MAX_CONNECTIONS = 1_048_576
# A call's head is about 10 lines; each connection still sending its head may
# buffer this much, limits.max_connections of them a worker (10000 x 1 MiB, 10 GiB).
MAX_HEADER_BYTES = 1_048_576
# HAProxy, which this replaces, stops at 1024 threads (16 groups of 64); each
# worker here is a Python process of its own with its memory and a channel the
# supervisor serves. "auto" follows the CPUs whatever their number.
MAX_WORKERS = 1024


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ListenSection(_Section):
    wss: str = "0.0.0.0:443"
    acme: OptionalAddress = "0.0.0.0:80"
    stats: OptionalAddress = "127.0.0.1:8404"
    admin_socket: str = "/run/fleet-ingress/admin.sock"  # a Unix socket path; "" disables

    @field_validator("wss")
    @classmethod
    def _wss_required(cls, value: str) -> str:
        if not value:
            raise ValueError(
                "cannot be empty: the carrier listener is the ingress; "
                "write HOST:PORT, e.g. 0.0.0.0:443"
            )
        return _address(value)

    @field_validator("wss", "acme", "stats")
    @classmethod
    def _listenable(cls, value: str) -> str:
        if value:
            host, port = parse_hostport(value, what="address")
            if ":" in host and (mapped := ipaddress.IPv6Address(host).ipv4_mapped):
                # Linux refuses to bind one (EINVAL), at start: say it here, for check.
                raise ValueError(
                    f"{host} is an IPv4 address written as IPv6, which no socket can "
                    f"listen on; write {mapped}:{port}"
                )
        return value

    @model_validator(mode="after")
    def _distinct_ports(self) -> Self:
        # Caught here, the clash names both keys; at bind time it is a bare EADDRINUSE.
        seen: dict[int, tuple[str, str]] = {}
        for key in ("wss", "acme", "stats"):
            if not (value := getattr(self, key)):
                continue
            host, port = parse_hostport(value, what="address")
            other = seen.setdefault(port, (key, host))
            if port and other[0] != key and (host == other[1] or {host, other[1]} & _WILDCARDS):
                raise ValueError(f"{key} and {other[0]} both use port {port}; give each its own")
        return self


class TLSSection(_Section):
    cert: Path | None = None
    key: Path | None = None
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"
    # Mozilla's server-side TLS guidelines (net/tls.py PROFILES); min_version is a floor
    # on top, so "modern" is TLS 1.3 only whatever it says.
    profile: Literal["intermediate", "modern", "openssl"] = "intermediate"
    # What carriers trust for this certificate, when not the system trust store:
    # a private CA, or the certificate itself when self-signed. Judged by `check`.
    ca_file: Path | None = None

    @field_validator("min_version", mode="before")
    @classmethod
    def _floor(cls, value: Any) -> Any:
        if value not in ("TLSv1.2", "TLSv1.3"):
            raise ValueError(
                f"{value!r} is not allowed: the floor is TLS 1.2; use 'TLSv1.2' or 'TLSv1.3'"
            )
        return value


class RoutesSection(_Section):
    proxy: list[str] = Field(default_factory=lambda: ["/ws/", "/exotel/"], min_length=1)
    health: str = "/haproxy-health"
    # Per call prefix, instead of timeouts.carrier_silence / fleet_silence (0: off there).
    carrier_silence: dict[str, OffOrSeconds] = Field(default_factory=dict)
    fleet_silence: dict[str, OffOrSeconds] = Field(default_factory=dict)

    @field_validator("proxy")
    @classmethod
    def _prefixes(cls, value: list[str]) -> list[str]:
        for prefix in value:
            # The trailing "/" keeps "/ws/" from also catching "/wsfoo".
            if not (prefix.startswith("/") and prefix.endswith("/")):
                raise ValueError(f"{prefix!r} must start and end with '/', e.g. '/ws/'")
        return value

    @field_validator("health")
    @classmethod
    def _health_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"{value!r} must start with '/', e.g. '/haproxy-health'")
        return value

    @model_validator(mode="after")
    def _health_not_proxied(self) -> Self:
        for prefix in self.proxy:
            if self.health.startswith(prefix):
                raise ValueError(
                    f"health {self.health!r} is under the proxied prefix {prefix!r}; "
                    "the local probe would be sent to a fleet"
                )
        return self

    @model_validator(mode="after")
    def _overrides_name_call_routes(self) -> Self:
        for key in ("carrier_silence", "fleet_silence"):
            for prefix in getattr(self, key):
                if prefix not in self.proxy:
                    raise ValueError(
                        f"{key}: {prefix!r} is not a call prefix; use one of routes.proxy "
                        f"({', '.join(repr(p) for p in self.proxy)})"
                    )
        return self


class FleetsSection(_Section):
    file: Path = Path("fleets.txt")
    maxconn: int = Field(16, ge=1, le=MAX_MAXCONN)
    verify: bool = True
    ca_file: Path | None = None
    health_path: str = "/health/fleet"
    capacity_key: str = Field("fleet_available", min_length=1)
    capacity_aware: bool = True
    check_interval: Seconds = 1.0
    check_timeout: Seconds = 1.0
    fall: int = Field(2, ge=1)
    rise: int = Field(2, ge=1)

    @field_validator("health_path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"{value!r} must start with '/', e.g. '/health/fleet'")
        return value


class RetrySection(_Section):
    retries: int = Field(3, ge=0)
    retry_on: list[str | int] = Field(
        default_factory=lambda: ["conn-failure", "empty-response", "response-timeout"]
    )

    @field_validator("retry_on", mode="before")
    @classmethod
    def _normalise(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value  # let the type check name the problem
        seen: list[str | int] = []
        for item in value:
            norm = _retry_condition(item)
            if norm not in seen:
                seen.append(norm)
        return seen

    @property
    def retry_conditions(self) -> frozenset[str]:
        return frozenset(item for item in self.retry_on if isinstance(item, str))

    @property
    def retry_statuses(self) -> frozenset[int]:
        return frozenset(item for item in self.retry_on if isinstance(item, int))


def _retry_condition(item: Any) -> str | int:
    if isinstance(item, str) and item.lower() in RETRY_WORDS:
        return item.lower()
    text = str(item)
    # bool is an int subclass: `true` in the list is a mistake, not status 1.
    if not isinstance(item, bool) and isinstance(item, int | str) and text.isdigit():
        if 400 <= int(text) <= 599:
            return int(text)
    raise ValueError(
        f"{item!r} is not a retry condition; use {', '.join(RETRY_WORDS)} "
        "or an HTTP status from 400 to 599"
    )


# timeouts.close_flush unset, where timeouts.tunnel is not shorter (net.proxy's
# CLOSE_FLUSH_TIMEOUT: what a context built without a configuration uses).
CLOSE_FLUSH_DEFAULT = 10.0


class TimeoutsSection(_Section):
    connect: Seconds = 3.0
    response: Seconds = 5.0
    request: Seconds = 10.0
    queue: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 3.0  # 0 = no queueing
    tunnel: Seconds = 3600.0
    drain: Seconds = 300.0
    # An upgrade's old generation keeps its calls this long (0: until they end);
    # unset: drain. A stop (SIGTERM) during it still drains for `drain` at most.
    upgrade_drain: Annotated[float | None, Field(ge=0, allow_inf_nan=False)] = None
    carrier_silence: OffOrSeconds = 30.0
    fleet_silence: OffOrSeconds = 0.0
    tcp_user_timeout: UserTimeoutSeconds = 20.0
    keepalive_idle: KeepaliveSeconds = 10.0  # 0 turns keepalive off
    keepalive_interval: Annotated[float, Field(ge=1, le=32767, allow_inf_nan=False)] = 5.0
    # A side closed with bytes still to send (a close frame, a bot's last words)
    # is cut this long after its close if its peer has not taken them all (a
    # bound on the whole flush, not HAProxy's inactivity timeout client-fin /
    # server-fin); net.proxy.CLOSE_FLUSH_TIMEOUT. A TLS side's close waits this
    # long when it is above tls_socket.CLOSE_TIMEOUT (10 s). At most `tunnel`:
    # a side whose peer reads nothing is a call with no bytes either way, which
    # is not held past `tunnel` while both are open (`_close_flush_within_tunnel`).
    # Unset, it is CLOSE_FLUSH_DEFAULT or `tunnel` when that is shorter
    # (`_unset_close_flush_follows_tunnel`): a tunnel of 5 s was refused for a
    # default nobody wrote, or, unset, left past it unjudged.
    close_flush: Seconds = CLOSE_FLUSH_DEFAULT

    @field_validator("close_flush")
    @classmethod
    def _close_flush_within_tunnel(cls, value: float, info: ValidationInfo) -> float:
        # 10000 meant as milliseconds held every unread close's buffers for 2.8 hours.
        tunnel = info.data.get("tunnel")
        if tunnel is not None and value > tunnel:
            raise ValueError(
                f"must be at most timeouts.tunnel, {tunnel:g} seconds (got {value:g}): it "
                "bounds how long a closing side waits for its peer to read, and a call "
                "with no bytes either way is closed after timeouts.tunnel; a flush takes "
                f"seconds: write seconds, not milliseconds, or raise timeouts.tunnel, or "
                f"remove timeouts.close_flush (unset, it is {CLOSE_FLUSH_DEFAULT:g} seconds, "
                "or timeouts.tunnel when shorter)"
            )
        return value

    @model_validator(mode="after")
    def _unset_close_flush_follows_tunnel(self) -> Self:
        if "close_flush" not in self.model_fields_set and self.close_flush > self.tunnel:
            self.close_flush = self.tunnel
            self.model_fields_set.discard("close_flush")  # still unset, as written
        return self

    def old_generation_drain(self) -> float:
        """Seconds an upgrade's old generation keeps its calls before closing
        the rest: `upgrade_drain`, or `drain` where it is not set; math.inf
        for 0 (until the calls end)."""
        if self.upgrade_drain is None:
            return self.drain
        return self.upgrade_drain or math.inf


def drain_to_wire(seconds: float) -> float:
    """An old generation's drain as a worker's `stop` and an exec's state carry
    it: upgrade_drain's own spelling, 0 for no limit (JSON has no infinity)."""
    return 0.0 if seconds == math.inf else seconds


def drain_from_wire(value: Any) -> float | None:
    """`drain_to_wire`'s seconds (math.inf for 0); None when `value` is none
    (a release that does not say it)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return float(value) or math.inf


class LimitsSection(_Section):
    max_header_bytes: int = Field(16384, ge=1024, le=MAX_HEADER_BYTES)
    # HAProxy's order (it refuses more than 101). Each line costs the event loop a
    # parse every live call waits on; a call's head has about 10.
    max_header_count: int = Field(100, ge=16, le=1000)
    max_queue: int = Field(256, ge=0)
    max_connections: int = Field(10000, ge=1, le=MAX_CONNECTIONS)
    keepalive_probes: int = Field(3, ge=1, le=127)
    # When new connections use more than this share of a core, a worker with live
    # calls spaces its accepts (core/accept_pacing.py): they wait, calls keep the CPU.
    new_connection_share: float = Field(0.3, gt=0.0, le=1.0)


class AcmeSection(_Section):
    upstream: Address = "127.0.0.1:8888"
    redirect_https: bool = True


def _lowercase(value: Any) -> Any:
    """`level = "INFO"` is what Python's logging spells: take it as "info"."""
    return value.lower() if isinstance(value, str) else value


class LogSection(_Section):
    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lowercase)] = (
        "info"
    )
    format: Annotated[Literal["json", "text"], BeforeValidator(_lowercase)] = "json"
    access: bool = True


def _workers(value: Any) -> Any:
    if value == "auto":
        return value
    if isinstance(value, str) and value.strip().isdigit():  # from the environment
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f'{value!r} is not a number of workers; write "auto" (one per CPU this '
            "process may run on) or a whole number of at least 1"
        )
    if value > MAX_WORKERS:
        raise ValueError(
            f'must be at most {MAX_WORKERS} (got {value!r}); write "auto" for one per CPU '
            "this process may run on"
        )
    return value


# process.worker_hang_timeout's least value but 0 (never).
MIN_HANG_TIMEOUT = 5.0


class ProcessSection(_Section):
    # SPEC 13: one supervisor and this many worker processes serving carriers.
    workers: Annotated[Literal["auto"] | int, BeforeValidator(_workers)] = "auto"
    # "auto": one per CPU of its affinity mask, fewer under its cgroup's CPU quota
    # (config.cpus, core.cpu_quota; worker_count).
    # cpu_affinity "auto": each worker runs on one CPU of its own (of this process's affinity
    # mask, round-robin past one each), as HAProxy's cpu-map and nginx's
    # worker_cpu_affinity do; "off": where the kernel puts it. Measured on 2 CPUs
    # with 2 workers: 8 % less CPU per relayed message pinned (bench/README).
    cpu_affinity: Literal["off", "auto"] = "off"
    # "spread": every worker takes new connections as its loop is free. "first":
    # in rank order: the first worker takes them while it keeps up, the others
    # each look at the accept queue every 50 ms and take them while any wait
    # (core.accept_order). A reload applies it at once.
    accept: Literal["spread", "first"] = "spread"
    # A worker that answers none of the supervisor's report requests for this
    # long (its event loop stuck: every call it carries frozen) is killed and
    # replaced, as one that died; shown "unresponsive" once one is 2 s unanswered.
    # 0: never killed; else at least 5 s (a shorter stall is not a hang). Read
    # at start: a reload notes a change, an upgrade applies it.
    worker_hang_timeout: float = Field(60.0, ge=0, allow_inf_nan=False)

    @field_validator("worker_hang_timeout")
    @classmethod
    def _hang_timeout_floor(cls, value: float) -> float:
        if 0 < value < MIN_HANG_TIMEOUT:
            raise ValueError(
                f"must be 0 (never kill a hung worker) or at least {MIN_HANG_TIMEOUT:g} "
                "seconds: a shorter stall of a busy worker is not a hang"
            )
        return value

    def worker_count(self) -> int:
        """How many workers to run: "auto" is the CPUs in this process's affinity
        mask (what taskset, cpusets and systemd's CPUAffinity= allow), not the host's,
        fewer when its cgroup's CPU quota (CPUQuota=) allows less time than those."""
        return self.workers_from()[0]

    def workers_from(self) -> tuple[int, str]:
        """How many workers to run, and where the number came from (the start
        log and stat): "2 (CPUQuota 200% of 64 CPUs)", "3 (process.workers)"."""
        if self.workers == "auto":
            auto = usable_cpus()
            return auto.count, auto.because
        return int(self.workers), f"{self.workers} (process.workers)"


@dataclass(frozen=True)
class _Load:
    toml_file: Path | None = None
    base_dir: Path | None = None
    # False: a configuration handed over (config_from_json), which holds what
    # the environment set already: not judged by the environment again.
    environment: bool = True


# pydantic-settings builds sources inside the constructor, with no argument to carry the
# file or base directory of this one load, so they travel in a context variable.
_DEFAULT_LOAD = _Load()
_LOAD: ContextVar[_Load] = ContextVar("_LOAD", default=_DEFAULT_LOAD)


class IngressConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid"
    )

    listen: ListenSection = Field(default_factory=ListenSection)
    tls: TLSSection = Field(default_factory=TLSSection)
    routes: RoutesSection = Field(default_factory=RoutesSection)
    fleets: FleetsSection = Field(default_factory=FleetsSection)
    retry: RetrySection = Field(default_factory=RetrySection)
    timeouts: TimeoutsSection = Field(default_factory=TimeoutsSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    acme: AcmeSection = Field(default_factory=AcmeSection)
    log: LogSection = Field(default_factory=LogSection)
    process: ProcessSection = Field(default_factory=ProcessSection)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier wins: the environment overrides what the file (or caller's dict) says.
        load = _LOAD.get()
        if not load.environment:
            return (init_settings,)
        toml_file = load.toml_file
        if toml_file is None:
            return env_settings, init_settings
        return env_settings, init_settings, _TomlFile(settings_cls, toml_file)

    @model_validator(mode="after")
    def _resolve_paths(self) -> Self:
        # Resolved once, so a reload after a chdir, or the admin client run from another
        # directory, finds the same files and socket as the server.
        base = (_LOAD.get().base_dir or Path.cwd()).absolute()
        tls, fleets, listen = self.tls, self.fleets, self.listen
        # Copies, not in-place edits: a section passed in by the caller stays untouched.
        self.tls = tls.model_copy(
            update={
                "cert": _absolute(tls.cert, base),
                "key": _absolute(tls.key, base),
                "ca_file": _absolute(tls.ca_file, base),
            }
        )
        self.fleets = fleets.model_copy(
            update={
                "file": _absolute(fleets.file, base),
                "ca_file": _absolute(fleets.ca_file, base),
            }
        )
        if listen.admin_socket:
            socket_path = str(_absolute(Path(listen.admin_socket), base))
            if len(os.fsencode(socket_path)) > _MAX_UNIX_PATH:
                raise ValueError(
                    f"listen.admin_socket {socket_path} is longer than the {_MAX_UNIX_PATH} "
                    "bytes a Unix socket path can have; choose a shorter path"
                )
            if (kind := not_a_socket(Path(socket_path))) is not None:
                # A stale socket there is replaced at start; this never is.
                raise ValueError(
                    f"listen.admin_socket {socket_path} is {kind}, not a socket; "
                    "choose a path of its own (the default is /run/fleet-ingress/admin.sock)"
                )
            self.listen = listen.model_copy(update={"admin_socket": socket_path})
        return self


class _TomlFile(TomlConfigSettingsSource):
    """The file as `read_config_text` reads it."""

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        return tomllib.loads(read_config_text(Path(file_path)))


def read_config_text(path: Path) -> str:
    """The configuration file's text. A byte-order mark first (Windows Notepad's
    UTF-8) is dropped, as the fleets file drops it: tomllib refused it as "TOML
    syntax error: Invalid statement (at line 1, column 1)", before any character
    an editor shows (the CLI audit of session 32)."""
    return path.read_text(encoding="utf-8").removeprefix("\ufeff")


def _absolute(path: Path | None, base: Path) -> Path | None:
    # No resolve(): certbot's live/ files are symlinks that renewal repoints, and
    # following them now would pin the old certificate across reloads.
    if path is None:
        return None
    path = path.expanduser()
    return path if path.is_absolute() else base / path


_NOT_OURS = PERMISSION_DENIED


def load_config(path: Path | None) -> IngressConfig:
    """Load a TOML file (None: defaults) with environment overrides; raise ConfigError."""
    if path is None:
        return _build({}, _Load(), "configuration")
    # TomlConfigSettingsSource silently skips a missing file; a typo'd -c must not mean defaults.
    try:
        present = path.is_file()
    except PermissionError:  # a directory on the way is not ours to enter
        raise ConfigError([f"{path}: cannot read the configuration file: {_NOT_OURS}"]) from None
    if not present:
        if path.is_dir():
            raise ConfigError(
                [
                    f"{path}: cannot read the configuration file: it is a directory; "
                    f"give the TOML file itself, e.g. -c {path / 'ingress.toml'}"
                ]
            )
        raise ConfigError([f"{path}: cannot read the configuration file: {_not_there(path)}"])
    return _build({}, _Load(toml_file=path, base_dir=path.parent), str(path))


def _not_there(path: Path) -> str:
    """Why `path`, not a directory, is no configuration file: "no such file"
    was said of a link to nothing and of a pipe (`-c <(...)`) alike."""
    if path.is_symlink() and not path.exists():
        return (
            f"it is a symbolic link to {os.readlink(path)}, which is not there; point the "
            "link at the TOML file, or give that file with -c"
        )
    try:
        mode = path.stat().st_mode
    except OSError:
        return "no such file"
    kind = "a pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    return (
        f"it is {kind}, not a regular file (it is read more than once); write the "
        "configuration to a file and give that"
    )


def _not_utf8(exc: UnicodeDecodeError) -> str:
    """Which line, and the byte, as the fleets file says it."""
    data = bytes(exc.object)
    line = data.count(b"\n", 0, exc.start) + 1
    return (
        f"line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8 text"
    )


def config_from_dict(data: dict[str, Any], *, base_dir: Path | None = None) -> IngressConfig:
    """Build a config in code with the same validation, path resolution and env overrides."""
    return _build(data, _Load(base_dir=base_dir), "configuration")


def config_to_json(config: IngressConfig) -> str:
    """A loaded configuration as JSON that `config_from_json` makes the same
    configuration of again: its paths already absolute; what is at its default
    (None included: never written in a file) left out, as a file leaves it out,
    so that code of another release (a replacement worker started while the
    venv holds it) reads only the keys set, as it would read the file."""
    data = config.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    if "close_flush" not in config.timeouts.model_fields_set:  # unset, it follows tunnel
        data.get("timeouts", {}).pop("close_flush", None)
    return json.dumps(data)


def config_from_json(text: str, *, base_dir: Path) -> IngressConfig:
    """`config_to_json`'s configuration, validated again (ConfigError if not),
    as the supervisor read it: the environment's values in it already (the
    worker inherits the same environment), not applied again."""
    source = "the configuration handed over by the supervisor"
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError([f"{source}: not JSON: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: not a JSON object"])
    # Releases before session 35 took worker_hang_timeout = inf (never) and hand
    # it as Infinity: read as its 0, or a worker of this release that such a
    # supervisor starts (a replacement while the venv holds this one) refuses
    # it and exits, again at every respawn (the review of session 35).
    process = data.get("process")
    if isinstance(process, dict) and process.get("worker_hang_timeout") == math.inf:
        data["process"] = {**process, "worker_hang_timeout": 0.0}
    # Past a bound of this release: read as the bound (`_within_bounds`). The
    # environment is not applied again: a value an older release took from
    # a variable (FLEET_INGRESS_PROCESS__WORKER_HANG_TIMEOUT=inf, a maxconn past
    # the bound), or one variable in two cases, refused by this release, made
    # such a worker exit at every respawn whatever the JSON said.
    return _build(_within_bounds(data), _Load(base_dir=base_dir, environment=False), source)


# The upper bounds of session 35, and the values they refuse in the file: a
# supervisor of an earlier release took them (written to mean "no limit": a
# maxconn of ten million), and hands them to each worker it starts. A worker of
# this release (a replacement while the venv holds it, before the `upgrade`)
# refused them and exited, again at every respawn: the host served with a
# worker fewer (the cross-version audit of session 35). Handed over, each is
# read as its bound, past anything a host carries; the file's is still refused.
_HANDED_BOUNDS: dict[tuple[str, str], int | float] = {
    ("process", "workers"): MAX_WORKERS,
    ("limits", "max_connections"): MAX_CONNECTIONS,
    ("limits", "max_header_bytes"): MAX_HEADER_BYTES,
    ("fleets", "maxconn"): MAX_MAXCONN,
    # Above it, setsockopt raised TypeError at every accept of that release.
    ("timeouts", "tcp_user_timeout"): MAX_USER_TIMEOUT,
}


def _within_bounds(data: dict[str, Any]) -> dict[str, Any]:
    for (section, key), bound in _HANDED_BOUNDS.items():
        values = data.get(section)
        if not isinstance(values, dict):
            continue
        value = values.get(key)
        if _number(value) and value > bound:
            data[section] = {**values, key: bound}
    # timeouts.close_flush is at most timeouts.tunnel since session 45: one above
    # it, handed by an earlier release's supervisor, is read as the tunnel's.
    timeouts = data.get("timeouts")
    if isinstance(timeouts, dict):
        flush = timeouts.get("close_flush")
        tunnel = timeouts.get("tunnel", TimeoutsSection.model_fields["tunnel"].default)
        if _number(flush) and _number(tunnel) and 0 < tunnel < flush:
            data["timeouts"] = {**timeouts, "close_flush": tunnel}
    return data


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# The variables Kubernetes sets in each pod for a Service named fleet-ingress (the
# Service's name upper-cased, `-` made `_`): FLEET_INGRESS_SERVICE_HOST,
# FLEET_INGRESS_SERVICE_PORT[_<PORT NAME>], FLEET_INGRESS_PORT and
# FLEET_INGRESS_PORT_<N>_<PROTO>[_PROTO|_PORT|_ADDR]; and for one named
# fleet-ingress-<NAME> (a scrape Service beside it): FLEET_INGRESS_<NAME>_SERVICE_HOST...
_KUBERNETES_SERVICE = re.compile(
    r"(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?|PORT(?:_\d+_(?:TCP|UDP|SCTP)(?:_PROTO|_PORT|_ADDR)?)?)"
)
_KUBERNETES_OTHER_SERVICE = re.compile(r"([A-Z0-9_]+?)_" + _KUBERNETES_SERVICE.pattern)


def _kubernetes_service(rest: str) -> str | None:
    """The Service a FLEET_INGRESS_<rest> variable is Kubernetes' for, or
    None: fleet-ingress's own first (FLEET_INGRESS_PORT_443_TCP_PORT is its
    port's, not a Service fleet-ingress-port-443-tcp's)."""
    if _KUBERNETES_SERVICE.fullmatch(rest):
        return "fleet-ingress"
    if other := _KUBERNETES_OTHER_SERVICE.fullmatch(rest):
        return "fleet-ingress-" + other[1].lower().replace("_", "-")
    return None


def _unknown_env_sections() -> list[str]:
    """pydantic-settings reads only the variables that name a field, so a misspelled
    section (FLEET_INGRESS_FLEET__MAXCONN) would be ignored without a word. Only
    names of our shape, with a `__`, or a section's key after a single `_`
    (FLEET_INGRESS_FLEETS_MAXCONN): the others are no setting of ours (Kubernetes'
    FLEET_INGRESS_SERVICE_HOST for a Service named fleet-ingress stopped the start),
    said by `unread_variables`."""
    sections = IngressConfig.model_fields
    problems = []
    for name in sorted(os.environ):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        if "__" not in name[len(ENV_PREFIX) :]:
            if (key := _one_underscore_key(name)) is not None:
                # FLEET_INGRESS_FLEETS_MAXCONN: ours, one `_` short (it was refused
                # as "not a section" until Kubernetes' names were let through,
                # then served at the file's value without a word but check's).
                # No Kubernetes name is one: theirs end in _HOST, _PORT and kin.
                problems.append(
                    f"environment: {ascii(name)[1:-1]}: one underscore before the key, so it "
                    f"sets nothing; write {ENV_PREFIX}{key[0].upper()}__{key[1].upper()}"
                )
            continue
        section = name[len(ENV_PREFIX) :].partition("__")[0].lower()
        if section not in sections:
            problems.append(
                f"environment: {name}: {section!r} is not a section; the sections are "
                f"{', '.join(sections)} (write {ENV_PREFIX}<SECTION>__<KEY>, e.g. "
                f"{ENV_PREFIX}FLEETS__MAXCONN)"
            )
    return problems


def _one_underscore_key(name: str) -> tuple[str, str] | None:
    """(section, key) when `name` is FLEET_INGRESS_<SECTION>_<KEY> of a real
    section and key (any case), a `__` written `_`; else None."""
    rest = name[len(ENV_PREFIX) :].lower()
    for section, field in IngressConfig.model_fields.items():
        model = field.annotation
        if rest.startswith(section + "_") and isinstance(model, type):
            key = rest[len(section) + 1 :]
            if key in getattr(model, "model_fields", {}):
                return section, key
    return None


def unread_variables(*, kubernetes: bool = True) -> list[str]:
    """The FLEET_INGRESS_ variables that are no setting: no section named and no
    `__`, so not refused (Kubernetes sets FLEET_INGRESS_SERVICE_HOST and its kin
    for a Service named fleet-ingress), but said, as a typo that names no key
    (FLEET_INGRESS_FLEET_MAXCONN) is one of these too. FLEET_INGRESS_FLEETS_MAXCONN,
    a section's key after one `_`, is refused (`_unknown_env_sections`).
    `kubernetes` False: Kubernetes' left out (`run` says the others)."""
    lines = []
    for name in sorted(os.environ):
        rest = name[len(ENV_PREFIX) :]
        if not name.upper().startswith(ENV_PREFIX) or "__" in rest:
            continue
        if rest.lower() in IngressConfig.model_fields or _one_underscore_key(name):
            continue  # a section's table, or refused (`_unknown_env_sections`)
        shown = ascii(name)[1:-1]
        if name.startswith(ENV_PREFIX) and (service := _kubernetes_service(rest)):
            if not kubernetes:
                continue
            lines.append(
                f"environment: {shown} is not read (Kubernetes sets it for a Service named "
                f"{service})"
            )
        else:
            lines.append(
                f"environment: {shown} is not read: a setting is "
                f"{ENV_PREFIX}<SECTION>__<KEY>, two underscores before the key, e.g. "
                f"{ENV_PREFIX}FLEETS__MAXCONN"
            )
    return lines


def unread_variables_said_by_run() -> list[str]:
    """`unread_variables` but Kubernetes', as `run` says them at its start and
    at each reload: only `check` did, and a value meant for a setting
    (FLEET_INGRESS_FLEET_MAXCONN) left the file's in force without a word in
    the journal. The fix needs a restart: the process keeps its environment."""
    return [
        f"{line}; fix it where it is set (`systemctl show fleet-ingress -p Environment`, "
        "the unit's Environment= or a drop-in), then restart the service (a reload or an "
        "upgrade keeps the environment it started with)"
        for line in unread_variables(kubernetes=False)
    ]


def _variables_in_two_cases() -> list[str]:
    """pydantic-settings reads a variable's name without regard to case, so
    FLEET_INGRESS_FLEETS__MAXCONN and fleet_ingress_fleets__maxconn both set
    were one of them, whichever the environment listed last, without a word.
    Refused when their values differ (the same value decides nothing)."""
    spellings: dict[str, list[str]] = {}
    for name in sorted(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            spellings.setdefault(name.upper(), []).append(name)
    return [
        "environment: "
        + " and ".join(f"{ascii(name)[1:-1]}={os.environ[name]!r}" for name in names)
        + " are one variable (its name is read without regard to case), and which one is "
        "taken is left to chance; unset all but one"
        for names in spellings.values()
        if len({os.environ[name] for name in names}) > 1
    ]


def file_text(path: Path | None) -> str | None:
    """The file's text (`read_config_text`); None when it cannot be read."""
    if path is None:
        return None
    try:
        return read_config_text(path)
    except (OSError, UnicodeDecodeError):
        return None


def settings_of_text(text: str | None) -> dict[str, Any]:
    """`file_settings` of a file's text as `file_text` read it."""
    if text is None:
        return {}
    try:
        loaded = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return {}
    return {name.lower(): value for name, value in loaded.items()}


def file_settings(path: Path | None) -> dict[str, Any]:
    """The file's tables as TOML reads them, sections lower-cased as `run`
    reads them; {} when it cannot be read (`load_config` says why)."""
    return settings_of_text(file_text(path))


def _environment_settings() -> list[tuple[str, list[str], Any]]:
    """Each FLEET_INGRESS_<SECTION>__<KEY> variable naming a section (the
    others are refused): its name, its path of keys, its value as read (JSON
    where it is JSON, as pydantic-settings reads it)."""
    found = []
    for name in sorted(os.environ):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if parts[0] not in IngressConfig.model_fields:
            continue
        try:
            setting: Any = json.loads(os.environ[name])
        except ValueError:
            setting = os.environ[name]
        found.append((name, parts, setting))
    return found


def environment_settings() -> dict[str, str]:
    """The FLEET_INGRESS_ variables of this process read as settings (naming a
    section), by name: what the admin socket's GET /environment answers, for
    `check` to tell where its own environment differs from the service's."""
    return {name: os.environ[name] for name, _, _ in _environment_settings()}


def _written(file_data: dict[str, Any], parts: list[str], setting: Any) -> Any:
    """What of the file's value at `parts` the environment's `setting` hides."""
    written: Any = file_data
    for part in parts:
        written = written.get(part) if isinstance(written, dict) else None
    return _hidden(written, setting)


# Where a variable hiding the file's value is to be changed, and why a restart.
_UNSET_AND_RESTART = (
    "unset it where it is set (`systemctl show fleet-ingress -p Environment`, the unit's "
    "Environment= or a drop-in), then restart the service to have the file's (a reload or "
    "an upgrade keeps the environment it started with)"
)


def environment_values(path: Path | None) -> list[str]:
    """Each key a FLEET_INGRESS_<SECTION>__<KEY> variable sets, in an operator's
    words: the variable, and the file's value it hides where the file sets the
    key too. The environment wins without a word otherwise: a value left in the
    unit's Environment= outlives every edit of the file (the config audit of
    session 35). Only variables naming a section (the others are refused)."""
    file_data = file_settings(path)
    lines = []
    for name, parts, setting in _environment_settings():
        # repr and ascii: a control character must not act where this is printed.
        dotted, shown = ascii(".".join(parts))[1:-1], ascii(name)[1:-1]
        line = f"{dotted} = {os.environ[name]!r} from environment variable {shown}, not the file"
        written = _written(file_data, parts, setting)
        if written is not None:
            # Then a restart: a reload, or an upgrade's exec, keeps the
            # environment the service started with (a reload after unsetting it
            # applied the variable still, and this check, given the unit's new
            # environment, said nothing of it).
            line += f"'s {_toml_text(written)}: the environment wins; {_UNSET_AND_RESTART}"
        lines.append(line)
    return lines


def edits_hidden(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Each key whose value in the file changed from `before` to `after`
    (`file_settings` of the file as the service first read it, its start
    before any upgrade or crash since (`Supervisor.file_read_text`), and
    as a reload reads it now) while a variable of this process's environment
    sets it: the edit is not applied, and a reload said nothing of it (an
    operator edited fleets.maxconn, reloaded, and FLEET_INGRESS_FLEETS__MAXCONN
    in the unit still won). A key the edit removed from the file is not said."""
    lines = []
    for name, parts, setting in _environment_settings():
        was, now = _written(before, parts, setting), _written(after, parts, setting)
        if now is None or was == now:
            continue
        dotted, shown = ascii(".".join(parts))[1:-1], ascii(name)[1:-1]
        was_said = "not set" if was is None else _toml_text(was)
        lines.append(
            f"{dotted}: the file's edit ({was_said} -> {_toml_text(now)}) is not applied: "
            f"environment variable {shown}={os.environ[name]!r} sets it, and the environment "
            f"wins; {_UNSET_AND_RESTART}"
        )
    return lines


def _hidden(written: Any, setting: Any) -> Any:
    """What of the file's `written` the environment's `setting` hides: a table
    (JSON) is merged key by key with the file's, as `run` reads them, so the
    file's keys it does not set stay in force; None when nothing is hidden."""
    if not (isinstance(written, dict) and isinstance(setting, dict)):
        return written
    hidden = {}
    for key, value in written.items():
        if key in setting and (under := _hidden(value, setting[key])) is not None:
            hidden[key] = under
    return hidden or None


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_text(value: Any) -> str:
    """`value` as the file writes it (an inline table, not Python's dict)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        pairs = (
            f"{key if _BARE_KEY.fullmatch(key) else repr(key)} = {_toml_text(item)}"
            for key, item in value.items()
        )
        return "{" + ", ".join(pairs) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_text(item) for item in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


# What a TOML value must be for a field of each Python type. pydantic would turn
# "no" into False or "32" into 32; a config file says what it means, so a quoted
# number or a word for a boolean is a mistake to point out. (The environment stays
# lax: its values are all strings.)
_TOML_KINDS: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"),
    int: ((int,), "a whole number, unquoted"),
    float: ((int, float), "a number, unquoted"),
    str: ((str,), "a quoted string"),
    Path: ((str,), "a quoted path"),
    list: ((list,), "a list, e.g. [...]"),
}
_TOML_TYPE_NAMES = {bool: "a boolean", int: "a number", float: "a decimal number", str: "a string"}


def _toml_kind(annotation: Any) -> tuple[tuple[type, ...], str] | None:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _toml_kind(get_args(annotation)[0])
    if origin is Literal:
        return (str,), "one of " + ", ".join(repr(v) for v in get_args(annotation))
    if origin in (Union, types.UnionType):
        kinds = [_toml_kind(a) for a in get_args(annotation) if a is not type(None)]
        return kinds[0] if len(kinds) == 1 else None
    return _TOML_KINDS.get(origin or annotation)


def _toml_type_problems(data: dict[str, Any], source: str, text: str = "") -> dict[str, str]:
    """{"section.key": the problem's line} for values of the wrong TOML type."""
    problems = {}
    for written, values in data.items():
        section = written.lower()  # [Fleets] is read as [fleets]
        field = IngressConfig.model_fields.get(section)
        if field is None or not isinstance(values, dict):
            continue  # pydantic names these
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        for key, value in values.items():
            key_field = model.model_fields.get(key)
            kind = None if key_field is None else _toml_kind(key_field.annotation)
            if kind is None or type(value) in kind[0]:
                continue
            what = _TOML_TYPE_NAMES.get(type(value), f"a {type(value).__name__}")
            shown = str(value).lower() if isinstance(value, bool) else repr(value)
            dotted = f"{section}.{key}"
            write = "a number of seconds, unquoted, e.g. 10" if _unit(dotted) else kind[1]
            where = _where(source, text, (written, key))
            problems[dotted] = f"{where}: {dotted}: {shown} is {what}; write {write}"
    return problems


def _sections_in_two_cases(data: dict[str, Any], source: str) -> list[str]:
    """[Fleets] is read as [fleets] (pydantic-settings ignores a name's case), so
    a file with both kept one table and lost the other's keys without a word."""
    spellings: dict[str, list[str]] = {}
    for written in data:
        if written.lower() in IngressConfig.model_fields:
            spellings.setdefault(written.lower(), []).append(written)
    return [
        f"{source}: {' and '.join(f'[{name}]' for name in written)} are one section (its "
        "name is read without regard to case), and the keys of one would be lost; put them "
        f"all under [{section}]"
        for section, written in spellings.items()
        if len(written) > 1
    ]


def _build(data: dict[str, Any], load: _Load, source: str) -> IngressConfig:
    if load.environment and (problems := _variables_in_two_cases() + _unknown_env_sections()):
        raise ConfigError(problems)
    toml_data: dict[str, Any] = {}
    text = ""  # the file's, for the line of each key a problem names
    if load.toml_file is not None:
        try:
            text = read_config_text(load.toml_file)
            toml_data = tomllib.loads(text)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            pass  # reported below, as pydantic-settings reads the file
    wrong_types = _toml_type_problems(toml_data, source, text) | _toml_type_problems(data, source)
    twice = _sections_in_two_cases(toml_data, source) + _sections_in_two_cases(data, source)
    token = _LOAD.set(load)
    try:
        config = IngressConfig(**data)
    except ValidationError as exc:
        others = [_describe(error, source, text, load.environment) for error in exc.errors()]
        # A key with a wrong type is named once, by the clearer of the two messages.
        others = [line for line in others if not any(f": {key}: " in line for key in wrong_types)]
        raise ConfigError([*twice, *wrong_types.values(), *others]) from None
    except tomllib.TOMLDecodeError as exc:  # its message ends with "(at line L, column C)"
        raise ConfigError([f"{source}: TOML syntax error: {exc}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else _not_utf8(exc)
        if isinstance(exc, PermissionError):
            reason = _NOT_OURS
        raise ConfigError([f"{source}: cannot read the configuration file: {reason}"]) from None
    except SettingsError as exc:  # e.g. an environment variable that is not valid JSON
        raise ConfigError([_env_not_json(exc) or f"{source}: {exc}"]) from None
    finally:
        _LOAD.reset(token)
    if twice or wrong_types:
        raise ConfigError([*twice, *wrong_types.values()])
    return config


# pydantic's bound errors, in an operator's words (the bound from the error's context).
_BOUNDS = {
    "greater_than_equal": ("ge", "at least"),
    "greater_than": ("gt", "more than"),
    "less_than_equal": ("le", "at most"),
    "less_than": ("lt", "less than"),
}
# What a bound's edge means, where it means something.
_ZERO_MEANS = {
    "timeouts.queue": "0 turns queueing off",
    "timeouts.carrier_silence": "0 turns it off",
    "timeouts.fleet_silence": "0 turns it off",
    "timeouts.tcp_user_timeout": "0 leaves the kernel's default",
    "timeouts.upgrade_drain": "0 keeps the old generation's calls until they end",
    "timeouts.keepalive_idle": "0 turns keepalive off",
    "process.worker_hang_timeout": "0 never kills a hung worker",
}


@functools.cache
def _seconds_keys() -> frozenset[str]:
    """The keys whose numbers are seconds: every float of [timeouts], and the
    intervals, timeouts and silences of the other sections."""
    keys = set()
    for section, field in IngressConfig.model_fields.items():
        for key, sub in field.annotation.model_fields.items():  # type: ignore[union-attr]
            timed = any(w in key for w in ("interval", "timeout", "silence"))
            if sub.annotation in (float, float | None) and (section == "timeouts" or timed):
                keys.add(f"{section}.{key}")
    return frozenset(keys)


def _unit(dotted: str) -> str:
    return " seconds" if dotted in _seconds_keys() else ""


def _where(source: str, text: str, loc: tuple[str | int, ...]) -> str:
    """`source`, and the line of the file's text that writes the key at `loc`
    where one does: `ingress.toml line 12`, as the fleets file's problems say."""
    line = key_line(text, loc) if text else None
    return source if line is None else f"{source} line {line}"


def _describe(error: Any, source: str, text: str = "", environment: bool = True) -> str:
    loc: tuple[str | int, ...] = error["loc"]
    dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if not dotted.isprintable():  # an unknown key's name is the file's text: no escapes shown raw
        dotted = ascii(dotted)[1:-1]
    if error["type"] == "extra_forbidden":
        problem = f"unknown key '{dotted}'{_did_you_mean(loc)}"
    elif error["type"] == "float_parsing" and _unit(dotted):  # "30s" from the environment
        problem = f"{error['input']!r} is not a number; write a number of seconds, e.g. 10"
    elif error["type"] in _BOUNDS and (ctx := error.get("ctx")):
        bound, words = _BOUNDS[error["type"]]
        edge = ctx[bound]
        if isinstance(edge, int | float):  # whole: no exponent (2147483, not 2.14748e+06)
            edge = f"{int(edge)}" if float(edge).is_integer() else f"{edge:g}"
        problem = f"must be {words} {edge}{_unit(dotted)} (got {error['input']!r})"
        if dotted in _ZERO_MEANS:
            problem += f"; {_ZERO_MEANS[dotted]}"
    else:
        problem = error["msg"].removeprefix("Value error, ")
        if error["type"] != "value_error":  # our own messages already quote the value
            problem += f" (got {error['input']!r})"
        if error["type"] == "finite_number" and dotted in _ZERO_MEANS:  # inf meant "never"
            problem += f"; {_ZERO_MEANS[dotted]}"
    hint = _env_hint(loc) if environment else ""
    problem += hint
    if hint and error["type"] in ("list_type", "dict_type"):
        # FLEET_INGRESS_RETRY__RETRY_ON=429: JSON, but not the list it must be
        # ("Input should be a valid list (got 429)", nothing of how to write one).
        problem += f"; {_json_example(loc, error['type'])}"
    # From the environment, the variable is named: no line of the file holds it.
    where = source if hint else _where(source, text, loc)
    return f"{where}: {dotted}: {problem}" if dotted else f"{where}: {problem}"


def _json_example(loc: tuple[str | int, ...], kind: str) -> str:
    """How a variable writes the list or table at `loc`: as JSON (as
    pydantic-settings reads it), the key's default for a list."""
    if kind == "dict_type":
        return "a table is written there as JSON, e.g. '{\"/exotel/\": 60}'"
    example = '["a", "b"]'
    section = IngressConfig.model_fields.get(str(loc[0])) if loc else None
    model = section.annotation if section is not None else None
    if len(loc) == 2 and isinstance(model, type) and issubclass(model, BaseModel):
        field = model.model_fields.get(str(loc[1]))
        if field is not None and field.default_factory is not None:
            example = json.dumps(field.default_factory())
    return f"a list is written there as JSON, e.g. '{example}'"


def _did_you_mean(loc: tuple[str | int, ...]) -> str:
    sections = {name: field.annotation for name, field in IngressConfig.model_fields.items()}
    options: dict[str, str] = {}
    if len(loc) == 1:
        options = {name: name for name in sections}
        # A key written above its [section] header lands at the top level.
        for section, model in sections.items():
            for key in model.model_fields:  # type: ignore[union-attr]
                options.setdefault(key, f"{section}.{key}")
    elif len(loc) == 2 and loc[0] in sections and loc[1] in sections:
        # `fleets.maxconn = 3` written below the [log] header is log.fleets.maxconn.
        return (
            f"; a key written below [{loc[0]}] is in it: move the line above [{loc[0]}] or "
            f"under a [{loc[1]}] header"
        )
    elif len(loc) == 2 and loc[0] in sections:
        # The same key in another section first: related keys live apart
        # (timeouts.keepalive_idle, limits.keepalive_probes), an easy slip.
        for section, model in sections.items():
            if loc[1] in model.model_fields:  # type: ignore[union-attr]
                return f"; did you mean '{section}.{loc[1]}'?"
        options = {key: key for key in sections[str(loc[0])].model_fields}  # type: ignore[union-attr]
    match = difflib.get_close_matches(str(loc[-1]), options, n=1)
    return f"; did you mean '{options[match[0]]}'?" if match else ""


def _env_not_json(exc: SettingsError) -> str | None:
    """pydantic-settings' 'error parsing value for field "routes" from source
    "EnvSettingsSource"' in an operator's words: the variable, and that a list or
    table is written as JSON there. None if the variable is not found."""
    found = re.search(r'field "(\w+)" from source "EnvSettingsSource"', str(exc))
    if found is None:
        return None
    prefix = ENV_PREFIX + found.group(1).upper()
    for name, value in os.environ.items():
        if name.upper() == prefix or name.upper().startswith(prefix + "__"):
            return (
                f"environment variable {name}={value!r}: not a value for "
                f"{name[len(ENV_PREFIX) :].lower().replace('__', '.')}; a list or table is "
                'written there as JSON, e.g. \'["/ws/", "/exotel/"]\' or \'{"/exotel/": 60}\''
            )
    return None


def _env_hint(loc: tuple[str | int, ...]) -> str:
    set_names = sorted(name.upper() for name in os.environ)
    for depth in (2, 1):
        name = ENV_PREFIX + "__".join(str(p) for p in loc[:depth]).upper()
        # A variable naming a level below the key (..._CONNECT__MS) made it a table.
        deeper = [other for other in set_names if other.startswith(name + "__")]
        if len(loc) >= depth and (name in set_names or (depth == 2 and deeper)):
            name = name if name in set_names else deeper[0]
            return f" (from environment variable {name if name.isprintable() else ascii(name)})"
    return ""
