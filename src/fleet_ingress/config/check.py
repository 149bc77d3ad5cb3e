"""`fleet-ingress check`: validate what `haproxy -c` never could, before a start or reload."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from fleet_ingress.config.check_report import WARNING
from fleet_ingress.config.cpus import usable_cpus
from fleet_ingress.config.fleet_lookup import shared_address_warnings
from fleet_ingress.config.fleets_file import (
    FleetsFileError,
    load_fleets_file,
    same_host_warnings,
)
from fleet_ingress.config.key_lines import key_lines
from fleet_ingress.config.settings import (
    ENV_PREFIX,
    ConfigError,
    IngressConfig,
    environment_values,
    load_config,
    read_config_text,
    unread_variables,
)
from fleet_ingress.core.addresses import format_hostport, parse_hostport
from fleet_ingress.core.certificate_change import CLOCK_SKEW
from fleet_ingress.core.fleet_spec import FleetSpec
from fleet_ingress.core.probe import ProbeResult, ProbeSettings, judge_health_response
from fleet_ingress.net.listener import ListenError, bind_errors_named, listen_sockaddr
from fleet_ingress.net.poller import health_session, probe_fleet
from fleet_ingress.net.tls import (
    TLSSetupError,
    chain_problem,
    fleet_ssl_context,
    leaf_facts,
    server_ssl_context,
)

# certbot renews at 30 days left; two weeks left means renewal has been failing for weeks.
EXPIRY_WARNING_DAYS = 14


def check_configuration(path: Path) -> list[str]:
    """Problems found in the configuration at `path`; lines starting with WARNING are not."""
    return _check(path)[2]


def run_check(
    path: Path,
    out: TextIO | None = None,
    *,
    probe: bool = False,
    before_start: bool = False,
    running: Callable[[IngressConfig], list[str]] | None = None,
    asks: bool = True,
) -> int:
    """Print the findings (to stdout by default) and return the exit status: 0 OK, 1 not.

    `probe` also sends one health probe to every fleet and judges it as the
    running ingress would: the check `haproxy -c` could never do.

    `before_start`: the unit's ExecStartPre. When workers of a supervisor that
    died still run in the unit (`workers_left_in_unit`), the supervisor
    started now takes them up with what its predecessor ran, not the files
    (service/fd_store.py): problems in the files are said, and do not keep it
    from starting (before, a crash with a broken edit on disk failed every
    restart, and the unit, every new call refused).

    `running`: what the running service says against this configuration
    (ops.service_environment: where its environment differs from this
    one's), warnings; not before a start, when none runs.

    `asks`: False for the upgrade's trial run (cli.CHECK_TRIAL_ARGUMENT): neither
    `running` nor the fleets' lookups are asked. Both say warnings alone,
    which the trial does not read (its environment is the running service's,
    handed down), and each took up to 2 s of a niced process's wait."""
    out = out or sys.stdout
    config, fleets, lines = _check(path)
    if running is not None and config is not None and not before_start and asks:
        lines += [f"{WARNING}{line}" for line in running(config)]
    if config is not None and fleets and not before_start and asks:
        # Not before a start: a start waits on no resolver (network-online.target
        # may come before DNS answers). Before a reload, LOOKUP_BUDGET at most.
        lines += [
            f"{WARNING}{config.fleets.file}: {shared}" for shared in shared_address_warnings(fleets)
        ]
    for line in lines:
        print(line, file=out)
    problems = [line for line in lines if not line.startswith(WARNING)]
    if problems and before_start and (left := workers_left_in_unit()):
        print(
            f"check: {len(problems)} problem(s), but {len(left)} process(es) of a supervisor "
            "that died still run in this unit: the supervisor started now takes them up with "
            "the configuration, fleets and certificate it ran, not these files; fix them, "
            "then reload",
            file=out,
        )
        return 0
    if problems and before_start and config is not None:
        # The certificate alone: the supervisor started now judges it. After a
        # restart it serves on the one it served before (systemd keeps it), as a
        # reload refuses such files; with none kept, it refuses to start, saying
        # why, or serves a chain carriers may fail to verify, warning (as `run`
        # always has: a restart that failed here took every call down).
        alone = _certificate_alone(config, path, problems)
        if alone == CERTIFICATE_CANNOT_LOAD:
            print(
                "check: the carrier certificate above cannot be served; left to the "
                "start: after a restart it serves the one it served before (systemd "
                "keeps it), otherwise it refuses to start, saying why; fix the files",
                file=out,
            )
            return 0
        if alone == CERTIFICATE_CHAIN_DOUBTED:
            print(
                "check: carriers may fail to verify the carrier certificate above; left "
                "to the start: after a restart it serves the one it served before (systemd "
                "keeps it), otherwise it serves this one, warning, and `fleet-ingress stat` "
                "says so; fix the files, then reload",
                file=out,
            )
            return 0
    if config is None:
        print(f"check failed: {len(problems)} problem(s)", file=out)
        return 1
    if probe and fleets:
        failures = asyncio.run(_probe_all(config, fleets, out))
        if failures:
            print(f"{failures} fleet(s) failed the health probe", file=out)  # below their lines
            problems += ["a fleet failed the health probe"] * failures  # each one a problem
    if problems:
        print(f"check failed: {len(problems)} problem(s)", file=out)
        return 1
    plural = "" if len(fleets) == 1 else "s"
    print(f"OK: {len(fleets)} fleet{plural}, listening on {_listeners(config)}", file=out)
    return 0


# What `certificate_alone` finds: every problem is why the carrier certificate
# cannot be served, or why carriers may fail to verify its chain.
CERTIFICATE_CANNOT_LOAD = "cannot load"
CERTIFICATE_CHAIN_DOUBTED = "chain doubted"


def certificate_alone(path: Path, problems: list[str]) -> str | None:
    """Whether `problems` (what `check -c path` printed, warnings left out) are
    the carrier certificate's alone: CERTIFICATE_CANNOT_LOAD, _CHAIN_DOUBTED,
    or None (another problem too, or the configuration does not load). What a
    start leaves to the supervisor (`check --before-start`), which serves on
    the certificate it served before over such files."""
    try:
        config = load_config(path)
    except ConfigError:
        return None
    return _certificate_alone(config, path, problems)


def _certificate_alone(config: IngressConfig, path: Path, problems: list[str]) -> str | None:
    if not problems:
        return None
    source = str(path)
    # As `_check` said them: with the line of the key each names.
    if loading := _with_key_lines(_certificate_load_problems(config, source), path):
        return CERTIFICATE_CANNOT_LOAD if set(problems) <= set(loading) else None
    chain = _with_key_lines(_certificate_chain_problems(config, source), path)
    if chain and set(problems) <= set(chain):
        return CERTIFICATE_CHAIN_DOUBTED
    return None


def workers_left_in_unit() -> list[int]:
    """The other processes of this process's control group (cgroup v2): when
    systemd starts the service again after its main process died, the workers
    it left running (KillMode=process). Empty at a first start, outside
    systemd, or when the group cannot be read."""
    try:
        groups = Path("/proc/self/cgroup").read_text().splitlines()
        path = next(line[3:] for line in groups if line.startswith("0::"))
        if path in ("", "/"):
            return []  # not in a unit of its own
        procs = Path("/sys/fs/cgroup", path.lstrip("/"), "cgroup.procs").read_text().split()
    except (OSError, StopIteration):
        return []
    return [int(pid) for pid in procs if pid.isdigit() and int(pid) != os.getpid()]


def run_body_check(body_file: Path, config_path: Path | None, out: TextIO | None = None) -> int:
    """Judge a captured /health/fleet body (status 200 assumed) as the poller would."""
    out = out or sys.stdout
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=out)
        return 1
    try:
        body = body_file.read_bytes()
    except OSError as exc:
        print(f"{body_file}: cannot read the captured body: {exc.strerror}", file=out)
        return 1
    result = judge_health_response(200, body, config.fleets.capacity_key)
    print(f"{body_file}: {result.describe(config.fleets.capacity_key)}", file=out)
    return 0 if result.passed else 1


async def _probe_all(config: IngressConfig, fleets: list[FleetSpec], out: TextIO) -> int:
    f = config.fleets
    settings = ProbeSettings(
        f.health_path, f.capacity_key, f.check_interval, f.check_timeout, f.fall, f.rise
    )
    try:
        fleet_ssl = fleet_ssl_context(verify=f.verify, ca_file=f.ca_file)
    except TLSSetupError as exc:
        print(f"fleets.ca_file: {exc}", file=out)
        return len(fleets)

    async def one(spec: FleetSpec) -> ProbeResult:
        async with health_session(fleet_ssl, settings) as session:
            return await probe_fleet(session, spec, settings)

    results = await asyncio.gather(*(one(spec) for spec in fleets))
    width = max(len(spec.name) for spec in fleets)
    for spec, result in zip(fleets, results, strict=True):
        where = f"{spec.url}{f.health_path}"
        print(f"probe {spec.name:<{width}}  {result.describe(f.capacity_key)}  ({where})", file=out)
    return sum(not r.passed for r in results)


def _check(path: Path) -> tuple[IngressConfig | None, list[FleetSpec], list[str]]:
    try:
        config = load_config(path)
    except ConfigError as exc:
        return None, [], exc.problems
    fleets: list[FleetSpec] = []
    lines: list[str] = []
    try:
        fleets = load_fleets_file(config.fleets.file, default_maxconn=config.fleets.maxconn)
    except FleetsFileError as exc:
        lines += str(exc).splitlines()  # one line per bad fleets-file line
    else:
        fleets_file = config.fleets.file
        lines += [f"{WARNING}{fleets_file}: {same}" for same in same_host_warnings(fleets)]
        if not fleets:
            lines.append(
                f"{config.fleets.file}: no fleets listed; "
                "add one a line: https://HOST[:PORT] [name=NAME] [maxconn=N] [admin=drain|maint]"
            )
    lines += _check_listen_addresses(config, str(path))
    lines += _check_admin_socket_directory(config, str(path))
    lines += _check_fleets_file_directory(config, str(path))
    lines += _check_certificate(config, str(path))
    fleets_cfg = config.fleets
    if fleets_cfg.ca_file is not None:
        try:
            fleet_ssl_context(verify=fleets_cfg.verify, ca_file=fleets_cfg.ca_file)
        except TLSSetupError as exc:
            lines.append(f"{path}: fleets.ca_file: {exc}")
    if not fleets_cfg.verify:
        lines.append(
            f"{WARNING}{path}: fleets.verify = false: fleet certificates are not checked, "
            "so anyone on the path to a fleet can read and alter calls; "
            "prefer fleets.ca_file for a private CA"
        )
    lines += [f"{WARNING}{path}: {doubt}" for doubt in doubtful_settings(config)]
    lines = _with_key_lines(lines, path)
    lines += [f"{WARNING}{path}: {value}" for value in environment_values(path)]
    lines += [f"{WARNING}{line}" for line in unread_variables()]
    return config, fleets, lines


def _with_key_lines(lines: list[str], path: Path) -> list[str]:
    """Each finding of the configuration file that names a key first
    (`ingress.toml: tls.cert: ...`) with the line of the file that writes it
    (`ingress.toml line 7: tls.cert: ...`), as load_config's problems and the
    fleets file's name theirs. Not where the environment sets the key: the
    file's line is not the value judged."""
    try:
        text = read_config_text(path)
    except (OSError, UnicodeDecodeError):
        return lines
    named = re.compile(rf"(?:{re.escape(WARNING)})?{re.escape(str(path))}: (\w+)\.(\w+)(?=[:, =])")
    written = key_lines(text)
    placed = []
    for line in lines:
        found = named.match(line)
        section, key = found.groups() if found else ("", "")
        at = written.get((section.lower(), key))  # the key itself, not its section's line
        if found is None or at is None or _from_environment(section, key):
            placed.append(line)
            continue
        start = found.start(1) - 2  # the ": " after the path
        placed.append(f"{line[:start]} line {at}{line[start:]}")
    return placed


def _from_environment(section: str, key: str) -> bool:
    """Whether a variable sets `section.key`: its own, one below it, or its
    section's table (JSON) holding the key, as `run` merges them."""
    name = f"{ENV_PREFIX}{section}__{key}".upper()
    table = f"{ENV_PREFIX}{section}".upper()
    for variable, value in os.environ.items():
        upper = variable.upper()
        if upper == name or upper.startswith(name + "__"):
            return True
        if upper == table:
            try:
                setting = json.loads(value)
            except ValueError:
                return True  # refused as the configuration is read; no line either way
            if not isinstance(setting, dict) or key in setting:
                return True
    return False


# Timeouts above this many seconds were likely written in milliseconds.
MILLISECONDS_LIKELY = 100.0
# timeouts.tcp_user_timeout's: minutes are a fair choice there (a carrier's
# call held through a link down that long), 20000 (20 s in ms) is not.
USER_TIMEOUT_MILLISECONDS_LIKELY = 1000.0
# The shipped unit's TimeoutStopSec: systemd kills what still drains after it.
UNIT_STOP_TIMEOUT = 330.0


def doubtful_settings(config: IngressConfig) -> list[str]:
    """Valid settings that are likely mistakes an operator would want named: each
    says what it does and what was probably meant (warnings: `check` passes)."""
    doubts = []
    retry_on = config.retry.retry_on
    if retry_on and "conn-failure" not in config.retry.retry_conditions:  # [] asks for none
        doubts.append(
            'retry.retry_on lacks "conn-failure": a call whose fleet refuses the '
            "connection is not tried on another fleet (a list given replaces the default "
            '["conn-failure", "empty-response", "response-timeout"]: add to it)'
        )
    t, f = config.timeouts, config.fleets
    ms_likely = MILLISECONDS_LIKELY
    for key, value, likely in (
        ("timeouts.connect", t.connect, ms_likely),
        ("timeouts.response", t.response, ms_likely),
        ("timeouts.request", t.request, ms_likely),
        ("timeouts.queue", t.queue, ms_likely),
        # A dead peer's unacknowledged data waits this long: 20000 is 5.5 hours.
        ("timeouts.tcp_user_timeout", t.tcp_user_timeout, USER_TIMEOUT_MILLISECONDS_LIKELY),
        ("fleets.check_interval", f.check_interval, ms_likely),
        ("fleets.check_timeout", f.check_timeout, ms_likely),
    ):
        if value >= likely:
            doubts.append(f"{key} = {value:g} seconds: seconds were meant, not milliseconds?")
    if f.check_timeout > f.check_interval:
        doubts.append(
            f"fleets.check_timeout ({f.check_timeout:g} s) is longer than fleets.check_interval "
            f"({f.check_interval:g} s): a fleet that answers slowly is probed less often than "
            "the interval says, and found DOWN later"
        )
    workers, cpus = config.process.workers, usable_cpus()
    if isinstance(workers, int) and workers > 2 * cpus.count:
        doubts.append(
            f"process.workers = {workers} is more than twice the {cpus.count} "
            f"CPU{'' if cpus.count == 1 else 's'} this process may run on"
            + (f" ({cpus.quota})" if cpus.quota else "")
            + ": the workers past them share those CPUs, each costing its memory, "
            'for no more calls; "auto" is one per CPU'
        )
    if cpus.unseen and workers == "auto":
        doubts.append(
            f"the CPU quota of this process's cgroup could not be read ({cpus.unseen}): "
            f'process.workers = "auto" counts the {cpus.count} CPU'
            f"{'' if cpus.count == 1 else 's'} of the affinity mask as if there were none; "
            "mount the cgroupfs from inside the namespace (a container's own "
            "/sys/fs/cgroup) or set process.workers"
        )
    if t.drain + 5 > UNIT_STOP_TIMEOUT:
        doubts.append(
            f"timeouts.drain = {t.drain:g} s: with the shipped unit, systemd kills the calls "
            f"still draining at TimeoutStopSec={UNIT_STOP_TIMEOUT:g}; raise it in a drop-in "
            "(systemctl edit fleet-ingress) above timeouts.drain"
        )
    return doubts


def _has_interface(index: int) -> bool:
    """Whether an interface has this index. Not socket.if_nameindex(): it asks
    over netlink, which the unit's RestrictAddressFamilies= refuses, and the
    unit's own `check --before-start` failed with a traceback for a zoned
    listener (the IPv6 audit of session 33): the unit never started."""
    try:
        socket.if_indextoname(index)
    except OSError:
        return False
    return True


def _check_listen_addresses(config: IngressConfig, source: str) -> list[str]:
    """What `run` would refuse before binding (a host name that does not
    resolve, a zone no interface has) and what it would warn of (a name with
    several addresses: one is listened on). Resolved as `run` resolves it
    (net.listener.listen_sockaddr); the bind itself is not tried (the ingress
    may be running on these addresses), but a bind of the address on a port
    the kernel picks is: it tells an address no interface has, which `run`
    found only at its bind (`_address_missing`)."""
    problems = []
    for key in ("wss", "acme", "stats"):
        if not (address := getattr(config.listen, key)):
            continue
        host, port = parse_hostport(address, what=f"listen.{key}")
        try:
            with bind_errors_named(key, address):
                family, sockaddr, others = listen_sockaddr(host, port)
        except ListenError as exc:
            problems.append(f"{source}: {exc}")
            continue
        scope = sockaddr[3] if len(sockaddr) == 4 else 0
        if scope and not _has_interface(scope):
            # A zone given as a number resolves whatever it is; the bind then fails.
            problems.append(
                f"{source}: listen.{key} = {address!r}: no interface of this machine has "
                f"index {scope}; give the zone of the interface with that address (`ip -6 addr`)"
            )
            continue
        try:
            with bind_errors_named(key, address):
                _address_missing(family, sockaddr)
        except ListenError as exc:
            # A warning, not a problem: the unit's ExecReload runs check, and an
            # address lost since the start (a keepalived address moved, DHCP)
            # refused every reload, a certificate renewal's too, while the socket
            # bound at the start serves on; a start fails at its bind, saying
            # this (the review of session 34).
            problems.append(
                f"{WARNING}{source}: {exc}; a start fails at this bind, while a running "
                "ingress serves on the socket it bound at its start (a reload is not refused)"
            )
            continue
        if others:
            shown = ", ".join(format_hostport(other, None) for other in others)
            problems.append(
                f"{WARNING}{source}: listen.{key} = {address!r}: {host} has several addresses: "
                f"listening on {format_hostport(sockaddr[0], port)} only, not on {shown}; give "
                f"[::]:{port} for both families on one socket, or one address"
            )
    return problems


def _address_missing(family: int, sockaddr: tuple[object, ...]) -> None:
    """Raises EADDRNOTAVAIL (or ENODEV, a zone no interface has) as `run`'s bind
    of `sockaddr` would, by binding its address on a port the kernel picks:
    never the port asked for, so an ingress running there (or a SO_REUSEPORT
    listener) is neither refused nor joined. Nothing listens: closed at once.
    Any other failure (the ephemeral ports used up) is left to the start."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((sockaddr[0], 0, *sockaddr[2:]))
    except OSError as exc:
        if exc.errno in (errno.EADDRNOTAVAIL, errno.ENODEV):
            raise


# The shipped unit makes it at every start (RuntimeDirectory=fleet-ingress), owned
# by the service's user: missing while the service is stopped, and no problem.
UNIT_RUNTIME_DIRECTORY = Path("/run/fleet-ingress")


def _check_admin_socket_directory(config: IngressConfig, source: str) -> list[str]:
    """Whether `run` can make listen.admin_socket (it creates missing
    directories, and replaces a stale socket): a file standing where a
    directory goes fails every start (a problem); a directory this user cannot
    write fails it for this user (a warning: check may run as another user
    than the service, root passes)."""
    if not (where := config.listen.admin_socket):
        return []
    socket_path = Path(where)
    directory = socket_path.parent
    existing = directory
    while not _seen(existing) and existing != existing.parent:
        existing = existing.parent
    named = f"{source}: listen.admin_socket = {where!r}"
    if not existing.is_dir():
        return [
            f"{named}: {existing} is a file where its directory goes; choose a path "
            "under a directory (the default is /run/fleet-ingress/admin.sock)"
        ]
    if os.access(existing, os.W_OK | os.X_OK):
        return []
    if existing != directory and directory == UNIT_RUNTIME_DIRECTORY:
        return []  # the unit makes it, for the service's user
    user = _user_name()
    if existing == directory:
        what = f"cannot create it in {directory}"
    elif not os.access(existing, os.X_OK):  # what is under it, if anything, is hidden
        what = f"cannot enter {existing}, on the way to {directory}"
    else:
        what = f"cannot create its directory {directory} in {existing}"
    return [
        f"{WARNING}{named}: this user ({user}) {what}, so `run` as this user fails; the "
        "service's user must be able to (the shipped unit makes /run/fleet-ingress for "
        "it): check as that user, `sudo -u fleet-ingress fleet-ingress check -c CONFIG`, "
        "or give it a directory of its own"
    ]


def _check_fleets_file_directory(config: IngressConfig, source: str) -> list[str]:
    """Whether this user can save a live fleet change: `add-fleet`, `remove-fleet`,
    `drain`, `maint` and `ready` rewrite fleets.file through a temp file and a
    rename in its directory (the file a symlink names, in its own directory; the
    backup beside the link). In a directory it cannot write (`init --out` made it
    root's, 0755, or the unit's ProtectSystem leaves it read-only) the first two
    are refused and the others apply unsaved, so a restart forgets a drain: a
    warning, as check may run as another user than the service (root passes)."""
    fleets_file = Path(config.fleets.file)
    if not _seen(fleets_file):
        return []  # reported as unreadable by the fleets-file check
    directories = [fleets_file.parent]
    if fleets_file.is_symlink():
        directories.insert(0, Path(os.path.realpath(fleets_file)).parent)
    for directory in directories:
        if os.access(directory, os.W_OK | os.X_OK):
            continue
        return [
            f"{WARNING}{source}: fleets.file {fleets_file}: this user ({_user_name()}) cannot "
            f"write in {directory}, so `add-fleet` and `remove-fleet` are refused, and "
            "`drain`, `maint` and `ready` apply but are not saved (a restart forgets them): "
            "give the "
            "directory the service's group, group-writable (`install -d -o root -g "
            f"fleet-ingress -m 2770 {directory}`), and under the unit a directory other than "
            "/etc/fleet-ingress needs ReadWritePaths= (docs/INSTALL.md section 2)"
        ]
    return []


def _seen(path: Path) -> bool:
    """Whether `path` is there as this user sees it: a directory above that
    this user cannot enter hides it, and is judged instead (Path.exists raised
    PermissionError: check printed a traceback, the review of session 33)."""
    try:
        return path.exists()
    except PermissionError:
        return False


def _user_name() -> str:
    import pwd

    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _certificate_load_problems(config: IngressConfig, source: str) -> list[str]:
    """Why tls.cert and tls.key cannot serve: not set, unreadable, or not a
    certificate and its key that load together. Empty when they load."""
    problems = []
    for name, file in (("tls.cert", config.tls.cert), ("tls.key", config.tls.key)):
        if file is None:
            problems.append(f"{source}: {name}: not set; the carrier listener needs it")
        elif reason := _unreadable(file):
            fix = (
                "; the service's group must read it: `chgrp fleet-ingress FILE && chmod 0640 "
                "FILE`, its directories too (docs/INSTALL.md section 3)"
                if reason == "Permission denied"
                else ""
            )
            if (gone := _dangling_link_target(file)) is not None:
                # certbot's live/ links into archive/: `ls` lists the link, so "No
                # such file" of it misled (the renewal audit of session 38).
                again = (
                    f"`certbot renew --cert-name {file.parent.name} --force-renewal`"
                    if file.parent.parent.name == "live"
                    else "`certbot renew --force-renewal`"
                )
                reason = (
                    f"a link to {gone}, which does not exist (certbot's live/ files link "
                    f"into its archive/): put that file back, or have certbot issue it again "
                    f"({again}), then reload"
                )
            problems.append(f"{source}: {name}: cannot read {file}: {reason}{fix}")
    cert, key = config.tls.cert, config.tls.key
    if problems or cert is None or key is None:
        return problems
    try:
        server_ssl_context(cert, key, config.tls.min_version, config.tls.profile)
        leaf_facts(cert)
    except TLSSetupError as exc:
        return [f"{source}: tls.cert, tls.key: {exc}"]
    return []


def _certificate_chain_problems(config: IngressConfig, source: str) -> list[str]:
    """Why carriers may fail to verify the chain of tls.cert (which loads), or
    why it cannot be judged (tls.ca_file)."""
    cert, key = config.tls.cert, config.tls.key
    assert cert is not None and key is not None  # they loaded
    if (ca_file := config.tls.ca_file) is not None and (reason := _unreadable(ca_file)):
        return [f"{source}: tls.ca_file: cannot read {ca_file}: {reason}"]
    try:
        # A chain clients cannot follow is an error here though `run` serves it (with a
        # warning): browsers fetch a missing intermediate, carriers' TLS stacks do not.
        if problem := chain_problem(cert, key, ca_file):
            return [f"{source}: tls.cert: {cert} {problem}"]
    except TLSSetupError as exc:
        return [f"{source}: tls.ca_file: {exc}"]
    return []


def _check_certificate(config: IngressConfig, source: str) -> list[str]:
    if problems := _certificate_load_problems(config, source):
        return problems
    if problems := _certificate_chain_problems(config, source):
        return problems
    cert = config.tls.cert
    assert cert is not None  # it loaded
    leaf = leaf_facts(cert)
    # Warnings, not errors: `run` must start with such a certificate, since its :80
    # listener is what lets certbot renew it. A reload refuses one (certificate_change).
    # Not yet valid first: a short-lived certificate (under the expiry warning's
    # days all its life) on a host whose clock is behind got only "expires in".
    warnings = []
    if time.time() < leaf.not_before - CLOCK_SKEW:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(leaf.not_before))
        clock = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        warnings.append(
            f"{WARNING}{source}: tls.cert: {cert} is not valid until {when} and this "
            f"host's clock reads {clock}: carriers will refuse it until then, unless this "
            "clock is behind (NTP not synced yet: check it with `timedatectl`, "
            "`chronyc tracking`)"
        )
    days_left = (leaf.not_after - time.time()) / 86400
    until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(leaf.not_after))
    if days_left < 0:
        # Still a warning: the unit's start and reload run check, and a check that
        # failed here would keep the :80 listener certbot renews through from
        # starting, and a fleets-only reload from applying (certificate_change).
        warnings.append(
            f"{WARNING}{source}: tls.cert: {cert} expired on {until}: every carrier's "
            "handshake fails with it; renew it (`certbot renew`: its challenge comes "
            "through this ingress's :80, which is why check still passes), then "
            "`systemctl reload fleet-ingress`"
        )
    elif days_left < EXPIRY_WARNING_DAYS:
        warnings.append(
            f"{WARNING}{source}: tls.cert: {cert} expires in {days_left:.0f} days (on "
            f"{until}); is renewal working? `certbot renew --dry-run` says"
        )
    return warnings


def _dangling_link_target(path: Path) -> Path | None:
    """The missing file a symlink at `path` (through any links) points to; None
    when `path` is no symlink or its target exists."""
    if not path.is_symlink() or path.exists():
        return None
    return Path(os.path.realpath(path))


def _unreadable(path: Path) -> str | None:
    try:
        path.open("rb").close()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _listeners(config: IngressConfig) -> str:
    listen = config.listen
    named = {
        "wss": listen.wss,
        "acme": listen.acme,
        "stats": listen.stats,
        "admin": listen.admin_socket,
    }
    return ", ".join(f"{name} {where}" for name, where in named.items() if where)
