"""The volume's TOML configuration, validated before anything touches disk or network.

A mistake must come back as one line that names the key (`targets[1].mode`)
and says what is wrong, so `load_config` turns pydantic's report into a
`ConfigError` and never lets a traceback reach the user. Secrets are held as
`SecretStr` so that a stray `repr()` or log line cannot print them.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from vaultsync.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(value: Any) -> int:
    """Accept 1048576, "1MiB", "1M" or "1 MB" (binary units throughout)."""
    if isinstance(value, bool):
        raise ValueError('must be a size such as 1048576 or "1MiB"')
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            unit = (m.group(2) or "").upper()[:1]
            return int(m.group(1)) * _UNITS[unit]
    raise ValueError(f'must be a size such as 1048576 or "1MiB" (got {value!r})')


Size = Annotated[int, BeforeValidator(parse_size)]

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: Any) -> float:
    """Accept 3600, "90s", "30m", "12h", "7d" or "2w", in seconds."""
    if isinstance(value, bool):
        raise ValueError('must be a duration such as 3600 or "7d"')
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _SECONDS[m.group(2).lower()]
    raise ValueError(f'must be a duration such as 3600, "30m", "12h" or "7d" (got {value!r})')


Duration = Annotated[float, BeforeValidator(parse_duration)]
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Credentials(_Strict):
    """Where a target's keys come from; the keys themselves never sit in the config.

    Either two environment variables, or a file of `access_key_id = ...` and
    `secret_access_key = ...` lines (readable by the daemon's user only).
    """

    access_key_id_env: str | None = None
    secret_access_key_env: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Credentials:
        env = self.access_key_id_env is not None or self.secret_access_key_env is not None
        if env and self.file is not None:
            raise ValueError(
                "give either access_key_id_env/secret_access_key_env or file, not both"
            )
        if env and not (self.access_key_id_env and self.secret_access_key_env):
            raise ValueError("access_key_id_env and secret_access_key_env must both be set")
        if not env and self.file is None:
            raise ValueError('set access_key_id_env and secret_access_key_env, or file = "path"')
        return self

    def resolve(self, where: str) -> tuple[str, SecretStr]:
        """Read the keys now; a missing variable or file is a config error naming it."""
        if self.file is not None:
            return _read_credentials_file(self.file, where)
        assert self.access_key_id_env and self.secret_access_key_env
        ak = os.environ.get(self.access_key_id_env)
        sk = os.environ.get(self.secret_access_key_env)
        for var, val in ((self.access_key_id_env, ak), (self.secret_access_key_env, sk)):
            if not val:
                raise ConfigError(
                    f"{where}.credentials: environment variable {var} is not set; "
                    f"export it before running vaultsync"
                )
        assert ak is not None and sk is not None
        return ak, SecretStr(sk)


def _read_credentials_file(path: Path, where: str) -> tuple[str, SecretStr]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(
            f"{where}.credentials.file: cannot read {path}: {e.strerror or e}"
        ) from None
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(
            f"{where}.credentials.file: {path} can be read by other users (mode {mode:o}); "
            f"run chmod 600 {path}"
        )
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        k, v = line.split("=", 1)
        values[k.strip().lower()] = v.strip().strip('"')
    ak, sk = values.get("access_key_id"), values.get("secret_access_key")
    if not ak or not sk:
        raise ConfigError(
            f"{where}.credentials.file: {path} must hold access_key_id = ... and "
            f"secret_access_key = ... lines"
        )
    return ak, SecretStr(sk)


class TargetConfig(_Strict):
    """One bucket at one provider that receives the volume's segments."""

    name: str = Field(pattern=NAME_RE)
    endpoint: str
    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = ""
    region: str = "us-east-1"
    mode: Literal["sync", "async"] = "async"
    # What a down sync target does to fsync: wait (then EIO) or carry on async.
    on_failure: Literal["block", "degrade"] = "degrade"
    # A witness holds only the control objects (the header, leases, heartbeats):
    # it votes in automatic failover and receives no data (docs/format.md §2.7).
    role: Literal["data", "witness"] = "data"
    # Whether it votes on who writes (auto mode): only a server that honours
    # conditional creates can (rclone's S3 server does not).
    vote: bool = True
    path_style: bool = True
    credentials: Credentials

    @field_validator("endpoint")
    @classmethod
    def _endpoint_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+(/.*)?$", v):
            raise ValueError(f"must be an http:// or https:// URL (got {v!r})")
        return v.rstrip("/")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = v.strip("/")
        if ".." in v.split("/"):
            raise ValueError("must not contain '..'")
        return f"{v}/" if v else ""


def _host_name() -> str:
    """The default site name: the host name, cut to what a name may hold."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0])[:63]
    return name if re.match(NAME_RE, name) else "site"


class SiteConfig(_Strict):
    """This site's name: in leases and heartbeats, so every site of a volume needs its own."""

    name: str = Field(default_factory=_host_name, pattern=NAME_RE)


Command = Annotated[list[str], Field(min_length=1)]

# The shortest failover_after: the writer's hold is a third of it, and a hold must
# fit two renewals of a PUT and a LIST each (docs/format.md §2.7).
MIN_FAILOVER_AFTER = 6.0


class FailoverConfig(_Strict):
    """Who decides that another site takes over: a person (manual) or the sites (auto)."""

    mode: Literal["manual", "auto"] = "manual"
    # Seconds without heartbeat progress at a majority of the voters before a
    # standby takes over; the writer's hold is a third of it (docs/format.md §2.7).
    failover_after: Duration = 15.0
    # Run when this site becomes the writer, or stops being it: a command as a list
    # (no shell), with VAULTSYNC_SITE, _EPOCH, _MOUNTPOINT and _REASON in its environment.
    on_promote: Command | None = None
    on_demote: Command | None = None
    hook_timeout: Duration = Field(default=120.0, gt=0, le=3600)

    @field_validator("failover_after")
    @classmethod
    def _long_enough(cls, v: float) -> float:
        if v < MIN_FAILOVER_AFTER:
            raise ValueError(
                f"must be at least {MIN_FAILOVER_AFTER:g} seconds (got {v:g}): the writer stops "
                "acknowledging after a third of it, which must leave room for two renewals"
            )
        return v


class VolumeConfig(_Strict):
    name: str = Field(pattern=NAME_RE)
    state_dir: Path
    # Small blocks keep a 4 KiB write + fsync cheap: a partial write rewrites one block.
    chunk_size: Size = 64 * 1024
    compression_level: int = Field(default=3, ge=0, le=22)
    encryption: bool = False
    # Where the passphrase of an encrypted volume comes from (never the config itself).
    passphrase_env: str = "VAULTSYNC_PASSPHRASE"
    passphrase_file: Path | None = None
    segment_size: Size = 32 * 1024 * 1024
    segment_max_age: float = Field(default=2.0, gt=0, le=3600)

    @field_validator("chunk_size")
    @classmethod
    def _chunk_size(cls, v: int) -> int:
        if v < 4096 or v > 64 * 1024**2 or v & (v - 1):
            raise ValueError("must be a power of two between 4KiB and 64MiB")
        return v

    @field_validator("segment_size")
    @classmethod
    def _segment_size(cls, v: int) -> int:
        if v < 1024**2 or v > 4 * 1024**3:
            raise ValueError("must be between 1MiB and 4GiB")
        return v


class ReplicationConfig(_Strict):
    # How many sync targets must hold a write before fsync returns; None = all.
    quorum: int | None = Field(default=None, ge=1)
    # How long fsync waits for a sync target with on_failure = "block" before EIO.
    block_timeout: float = Field(default=60.0, gt=0, le=3600)
    # Make close() wait for the sync targets too, as fsync does.
    sync_on_close: bool = False
    # How often each target is probed by the health monitor.
    probe_interval: float = Field(default=5.0, gt=0, le=600)
    # Upload a catalog checkpoint after this many transactions (0: never), checked
    # every checkpoint_check seconds.
    checkpoint_every: int = Field(default=20000, ge=0)
    checkpoint_check: float = Field(default=30.0, gt=0, le=3600)
    # ... and at least this often while transactions keep coming (0: count only), so
    # that retention has points to keep outside its keep-everything window.
    checkpoint_interval: Duration = Field(default=600.0, ge=0)


class RetentionConfig(_Strict):
    """Which points stay recoverable (docs/format.md §2.6); GC deletes what none needs."""

    # Every point younger than this stays recoverable.
    keep_all: Duration = Field(default=7 * 86400.0, ge=0)
    # Older than that: the newest checkpoint of each of the last N hours, days, weeks
    # (ISO weeks) and months stays recoverable. Named snapshots stay until deleted.
    hourly: int = Field(default=24, ge=0)
    daily: int = Field(default=14, ge=0)
    weekly: int = Field(default=8, ge=0)
    monthly: int = Field(default=12, ge=0)
    # How often the mount daemon runs GC (0: only `vaultsync gc`).
    gc_interval: Duration = Field(default=3600.0, ge=0)
    # A segment whose live bytes fall below this share of its size is compacted.
    compact_below: float = Field(default=0.5, ge=0, le=1)


class MountConfig(_Strict):
    """How the FUSE mount trades CPU and kernel caching for speed (fuse/loop.py, operations.py)."""

    # After a request, keep polling /dev/fuse this many microseconds before sleeping:
    # on machines where waking an idle CPU is slow it multiplies small-request rates.
    busy_poll_us: int = Field(default=200, ge=0, le=100_000)
    # The kernel's writeback cache: writes gather in the page cache and reach the
    # daemon in large pieces (fast streaming writes); the kernel then owns regular
    # files' mtime/ctime and sends extra requests for them on rename, unlink and fsync.
    writeback_cache: bool = False


class ApiToken(_Strict):
    """A bearer token, kept only as its hash (`vaultsync token new` prints both once)."""

    name: str = Field(pattern=NAME_RE)
    hash: str
    scope: Literal["read", "admin"] = "read"

    @field_validator("hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", v):
            raise ValueError(
                'must be "sha256:" and 64 hex digits, as printed by `vaultsync token new` '
                "(the token itself never goes in the config)"
            )
        return v


def parse_host_port(value: str) -> tuple[str, int]:
    """HOST:PORT as `[api] listen` and `serve --listen` take it (an IPv6 host in brackets).

    A ValueError says what is wrong; the config and the command line each add where.
    """
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'must be HOST:PORT such as "127.0.0.1:8470" (got {value!r})')
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiConfig(_Strict):
    """`[api]`: the REST restore API (`vaultsync serve`, or inside `vaultsync mount`)."""

    # true: `vaultsync mount` serves the API too, on the mount's event loop.
    enabled: bool = False
    listen: str = "127.0.0.1:8470"
    tokens: list[ApiToken] = Field(default_factory=list)
    # No token needed, only ever on a loopback address: for a single-user machine.
    open_on_loopback: bool = False
    # Restore jobs write only under these directories.
    restore_roots: list[Path] = Field(default_factory=list)
    # Where the mount daemon's API rebuilds past points from (default: the first target).
    from_target: str | None = None
    max_page: int = Field(default=1000, ge=1, le=100000)
    point_cache: int = Field(default=4, ge=1, le=64)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_host_port(v)
        return v

    @model_validator(mode="after")
    def _open_only_on_loopback(self) -> ApiConfig:
        names = [t.name for t in self.tokens]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"api.tokens: duplicate token name {sorted(dup)[0]!r}")
        for r in self.restore_roots:
            if not r.is_absolute():
                raise ValueError(f"api.restore_roots: {str(r)!r} must be an absolute path")
        if self.open_on_loopback and not is_loopback(parse_host_port(self.listen)[0]):
            raise ValueError(
                f"api.open_on_loopback: only allowed when api.listen is a loopback address "
                f"(got {self.listen!r}); use tokens for a server others can reach"
            )
        return self

    def host_port(self) -> tuple[str, int]:
        return parse_host_port(self.listen)


class Config(_Strict):
    volume: VolumeConfig
    targets: list[TargetConfig] = Field(default_factory=list)
    replication: ReplicationConfig = ReplicationConfig()
    retention: RetentionConfig = RetentionConfig()
    mount: MountConfig = MountConfig()
    api: ApiConfig = ApiConfig()
    site: SiteConfig = SiteConfig()
    failover: FailoverConfig = FailoverConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        names = [t.name for t in self.targets]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"targets: duplicate target name {sorted(dup)[0]!r}")
        for i, t in enumerate(self.targets):
            if t.role == "witness" and t.mode == "sync":
                raise ValueError(
                    f"targets: targets[{i}] ({t.name!r}) is a witness, which holds no data: "
                    'it cannot be mode = "sync"; leave mode out'
                )
        for i, t in enumerate(self.targets):
            if t.role == "witness" and not t.vote:
                raise ValueError(
                    f"targets: targets[{i}] ({t.name!r}) is a witness that does not vote: "
                    "it would serve no purpose; remove it or let it vote"
                )
        if self.targets and not self.data_targets:
            raise ValueError("targets: every target is a witness; at least one must hold data")
        if self.failover.mode == "auto" and self.targets and not self.voters:
            raise ValueError("targets: in auto failover mode at least one target must vote")
        if any(t.role == "witness" for t in self.targets) and self.failover.mode != "auto":
            raise ValueError(
                'targets: a witness only votes in automatic failover; set [failover] mode = "auto" '
                "or remove the witness"
            )
        q = self.replication.quorum
        n_sync = sum(t.mode == "sync" for t in self.targets)
        if q is not None and q > n_sync:
            raise ValueError(
                f'replication.quorum: is {q} but only {n_sync} target(s) have mode = "sync"'
            )
        if self.api.from_target is not None and self.api.from_target not in names:
            raise ValueError(
                f"api.from_target: no target named {self.api.from_target!r} "
                f"(targets: {', '.join(names) or 'none'})"
            )
        if self.api.from_target is not None and self.target(self.api.from_target).role != "data":
            raise ValueError(
                f"api.from_target: {self.api.from_target!r} is a witness: it holds no data"
            )
        return self

    @property
    def voters(self) -> list[TargetConfig]:
        """The targets that decide who writes in auto mode (docs/format.md §2.7)."""
        return [t for t in self.targets if t.vote]

    @property
    def data_targets(self) -> list[TargetConfig]:
        """The targets that receive the volume's history (witnesses hold only leases)."""
        return [t for t in self.targets if t.role == "data"]

    def target(self, name: str) -> TargetConfig:
        for t in self.targets:
            if t.name == name:
                return t
        known = ", ".join(t.name for t in self.targets) or "none"
        raise ConfigError(f"no target named {name!r} in the config (targets: {known})")

    def passphrase(self) -> str:
        """The volume passphrase from its file or environment variable."""
        v = self.volume
        if v.passphrase_file is not None:
            try:
                text = v.passphrase_file.read_text().rstrip("\n")
            except OSError as e:
                raise ConfigError(
                    f"volume.passphrase_file: cannot read {v.passphrase_file}: {e.strerror or e}"
                ) from None
            if not text:
                raise ConfigError(
                    f"volume.passphrase_file: {v.passphrase_file} is empty; "
                    "write the passphrase in it"
                )
            return text
        p = os.environ.get(v.passphrase_env)
        if not p:
            raise ConfigError(
                f"volume.encryption is on but environment variable {v.passphrase_env} is empty; "
                f"export the passphrase or set volume.passphrase_file"
            )
        return p


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _explain(err: ValidationError) -> str:
    e = err.errors()[0]
    # Validator errors that raise ValueError carry a "Value error, " prefix.
    msg = str(e["msg"]).removeprefix("Value error, ")
    loc = tuple(p for p in e["loc"] if p not in ("function-after",))
    kind = e["type"]
    if kind == "missing":
        msg = "is required but missing"
    elif kind == "extra_forbidden":
        msg = "is not a known setting (check the spelling)"
    elif kind == "literal_error":
        got = e.get("input")
        msg = f"{msg} (got {got!r})"
    elif kind == "string_pattern_mismatch":
        msg = "must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
    # Cross-field messages already name their key.
    if msg.startswith(("targets:", "replication.", "api.", "failover.")):
        return msg
    return f"{_loc(loc)}: {msg}"


def parse_config(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_explain(e)}") from None


def _anchor_paths(data: dict[str, Any], base: Path) -> None:
    def fix(d: Any, key: str) -> None:
        if isinstance(d, dict) and isinstance(d.get(key), str) and d[key]:
            p = Path(d[key]).expanduser()
            d[key] = str(p if p.is_absolute() else base / p)

    vol = data.get("volume")
    fix(vol, "state_dir")
    fix(vol, "passphrase_file")
    api = data.get("api")
    if isinstance(api, dict) and isinstance(api.get("restore_roots"), list):
        api["restore_roots"] = [
            str(base / Path(r).expanduser()) if isinstance(r, str) else r
            for r in api["restore_roots"]
        ]
    targets = data.get("targets")
    if isinstance(targets, list):
        for t in targets:
            if isinstance(t, dict):
                fix(t.get("credentials"), "file")


def load_config(path: Path | str) -> Config:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; a config file is TOML") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    # Relative paths in the file are relative to the file, not to wherever we were started.
    _anchor_paths(data, path.resolve().parent)
    cfg = parse_config(data, str(path))
    return cfg
