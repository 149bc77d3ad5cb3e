"""`fleet-ingress init`: write one deployment's ingress.toml and fleets.txt (and,
with `--vip`, this host's keepalived.conf: SPEC section 14).

The old design's `render.sh`: the brand-agnostic example (shipped in the package,
a copy of `config/`) with `__INGRESS_DOMAIN__` filled in and the example fleets
replaced by the `--fleet` URLs. Nothing is written when any `__NAME__`
placeholder would survive, a fleet URL is bad, or a file already exists (unless
`force`). The files are then checked as `fleet-ingress check` would; a missing
certificate is expected until certbot has issued it and is reported apart from
real problems.

Imports stay light here (no pydantic, no aiohttp): the CLI builds its parser
from `add_init_arguments` on every invocation.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from fleet_ingress.config.atomic import FileExists, keep_numbered_backup, write_atomically
from fleet_ingress.config.fleets_file import FleetsFileError, format_fleets_text, parse_fleets_text

CONFIG_NAME = "ingress.toml"
FLEETS_NAME = "fleets.txt"
TEMPLATE_NAMES = (CONFIG_NAME, FLEETS_NAME)
PLACEHOLDER = re.compile(r"__[A-Z0-9_]+__")
DOMAIN_PLACEHOLDER = "__INGRESS_DOMAIN__"
# Where the fleet lines go in a template that marks the spot; otherwise they replace
# the example's fleet lines (the ones in config/fleets.txt are example.com hosts).
FLEETS_PLACEHOLDER = "__FLEET_SERVERS__"
FILLED = (DOMAIN_PLACEHOLDER, FLEETS_PLACEHOLDER)
DEFAULT_MAXCONN = 16  # fleets.maxconn when the template does not set it

# Two hosts sharing one address (SPEC section 14): keepalived.conf beside ingress.toml.
KEEPALIVED_NAME = "keepalived.conf"
KEEPALIVED_FILLED = (
    DOMAIN_PLACEHOLDER,
    "__VIRTUAL_ADDRESS__",
    "__INTERFACE__",
    "__PEER__",
    "__PRIORITY__",
    "__VIRTUAL_ROUTER_ID__",
    "__LIVE_CHECK__",
    "__SCRIPT_USER__",
    "__UNICAST_SOURCE__",
)
_IPV4_WILDCARD_LISTEN = re.compile(r'(?m)^((?:wss|acme) = )"0\.0\.0\.0:(\d+)"')
DEFAULT_PRIORITY = 100
DEFAULT_SCRIPT_USER = "fleet-ingress"  # the service's own user: it can read ingress.toml
# A Linux interface name (IFNAMSIZ 16 with the NUL) and a Unix user name.
_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,14}")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# keepalived -t (2.2) ends by SIGTERM-ing itself even on a clean file; its verdict is
# what it prints.
_KEEPALIVED_CLEAN_EXITS = (0, -15, 143)
# What keepalived's words mean for an operator of this file.
_KEEPALIVED_HINTS = {
    "script uid/gid": "hint: --script-user must name a user of this host (docs/INSTALL.md, "
    "section 1 creates fleet-ingress)",
    "doesn't exist": "hint: run init on the host this file is for; `ip -br link` lists "
    "its interfaces",
    "insecure": "hint: with enable_script_security every directory of the check's path "
    "must be root's and writable by root only",
}

# A DNS name certbot can get an HTTP-01 certificate for: it becomes a path under
# /etc/letsencrypt/live/ and a TOML string, so nothing else may slip through.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

# Exit statuses of main_init.
OK, CHECK_FAILED, NOT_WRITTEN = 0, 1, 2


class InitError(Exception):
    """Nothing was written; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class TwoHosts:
    """This host's part in a pair sharing one address with keepalived (VRRP)."""

    vip: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    interface: str
    peer: ipaddress.IPv4Address | ipaddress.IPv6Address
    priority: int = DEFAULT_PRIORITY
    router_id: int = 0  # 0: derived from the address, so both hosts agree untold
    script_user: str = DEFAULT_SCRIPT_USER
    # This host's own address on `interface`, the one the other host's `peer` names:
    # the adverts' source. None: keepalived's choice (the primary IPv4 address).
    source: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None

    @property
    def virtual_router_id(self) -> int:
        return self.router_id or self.vip.ip.packed[-1] or 255


def two_hosts(
    vip: str,
    interface: str,
    peer: str,
    *,
    priority: int = DEFAULT_PRIORITY,
    router_id: int | None = None,
    script_user: str = DEFAULT_SCRIPT_USER,
    source: str | None = None,
) -> TwoHosts:
    """Checked values for keepalived.conf; InitError naming the option otherwise."""
    if "/" not in vip:
        raise InitError(
            f"--vip {vip!r}: give the shared address with its prefix, e.g. --vip 192.0.2.10/24 "
            "(the prefix of the network it is on)"
        )
    try:
        address = ipaddress.ip_interface(vip)
    except ValueError:
        raise InitError(f"--vip {vip!r} is not ADDRESS/PREFIX, e.g. 192.0.2.10/24") from None
    ip, net = address.ip, address.network
    if ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local:
        raise InitError(
            f"--vip {vip}: carriers cannot reach a loopback, multicast or link-local address"
        )
    if net.num_addresses > 2 and ip in (net.network_address, net.broadcast_address):
        raise InitError(
            f"--vip {vip}: {ip} is the network's own or broadcast address; pick a host address"
        )
    try:
        peer_ip = ipaddress.ip_address(peer)
    except ValueError:
        raise InitError(
            f"--peer {peer!r}: give the other ingress host's address on --interface, an IP "
            "address (VRRP adverts go to it by unicast)"
        ) from None
    if peer_ip.version != ip.version:
        raise InitError(f"--peer {peer} and --vip {vip}: give both as IPv{ip.version} addresses")
    if peer_ip == ip:
        raise InitError(
            f"--peer {peer}: that is the shared address; give the other host's own address"
        )
    if not _IFNAME.fullmatch(interface):
        raise InitError(
            f"--interface {interface!r} is not a network interface name (ip -br link lists them)"
        )
    if not 1 <= priority <= 254:
        raise InitError(f"--priority {priority}: give 1 to 254 (higher wins a simultaneous start)")
    if router_id is not None and not 1 <= router_id <= 255:
        raise InitError(f"--vrid {router_id}: give 1 to 255, the same on both hosts")
    if not _USER.fullmatch(script_user):
        raise InitError(f"--script-user {script_user!r} is not a user name")
    source_ip = _source(source, vip, ip, peer_ip)
    return TwoHosts(address, interface, peer_ip, priority, router_id or 0, script_user, source_ip)


def _source(
    source: str | None,
    vip: str,
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    peer: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if source is None:
        if ip.version == 6:
            # keepalived sends IPv6 adverts from the link-local address, which the
            # other host's unicast_peer does not name: each would take the other for
            # gone and both would hold the address (the IPv6 audit of session 14).
            raise InitError(
                f"--vip {vip} is IPv6: give --source, this host's own address on "
                "--interface (the one the other host's --peer names); keepalived would "
                "send its adverts from the link-local address, which the other host "
                "ignores, and both hosts would hold the shared address"
            )
        return None
    try:
        source_ip = ipaddress.ip_address(source)
    except ValueError:
        raise InitError(
            f"--source {source!r}: give this host's own address on --interface, an IP address"
        ) from None
    if source_ip.version != ip.version:
        raise InitError(
            f"--source {source} and --vip {vip}: give both as IPv{ip.version} addresses"
        )
    if source_ip in (ip, peer):
        which = "the shared address" if source_ip == ip else "--peer, the other host's"
        raise InitError(f"--source {source}: that is {which}; give this host's own address")
    return source_ip


def live_check_command(config_path: Path) -> str:
    """The track script keepalived runs: this installation's `fleet-ingress check
    -c CONFIG --live`, by absolute path (keepalived has no PATH to speak of)."""
    script = Path(sys.executable).parent / "fleet-ingress"
    argv = [str(script)] if script.is_file() else [sys.executable, "-m", "fleet_ingress"]
    argv += ["check", "-c", str(config_path), "--live"]
    # keepalived splits the script line on spaces and has its own quoting.
    if odd := [a for a in argv if re.search(r"[\s'\"\\]", a)]:
        raise InitError(
            f"{odd[0]!r}: keepalived's script line cannot hold spaces or quotes; install "
            "fleet-ingress and choose --out under paths without them"
        )
    return " ".join(argv)


@dataclass(frozen=True)
class DeploymentCheck:
    """`fleet-ingress check` on freshly written files, sorted for `init` to report."""

    problems: list[str] = field(default_factory=list)  # real: init fails
    # tls.cert / tls.key files that do not exist yet: expected until certbot has run.
    missing_certificate: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # reported, never fail

    @property
    def ok(self) -> bool:
        return not self.problems


def render_deployment(
    domain: str,
    fleet_urls: list[str],
    out_dir: Path,
    *,
    template_dir: Path | None = None,
    force: bool = False,
    pair: TwoHosts | None = None,
    backups: dict[Path, Path] | None = None,
) -> list[Path]:
    """Write out_dir/ingress.toml and out_dir/fleets.txt (and with `pair`
    out_dir/keepalived.conf); return their paths.

    Each `fleet_urls` item is one fleets-file line, `URL [name=NAME] [maxconn=N]`.
    Raises InitError, with nothing written, on a bad domain or fleet, a surviving
    placeholder, or an existing file when not `force` (with `force` each old file
    is kept as the first free NAME.bak.N, never replacing a backup; `backups` is
    filled with file -> backup). Each file is replaced atomically; when one cannot
    be written, those written are taken back and InitError says so.
    """
    domain = normalise_domain(domain)
    names = TEMPLATE_NAMES + ((KEEPALIVED_NAME,) if pair is not None else ())
    templates = _read_templates(template_dir, names)
    _refuse_unknown_placeholders(templates)
    config_text = templates[CONFIG_NAME][1].replace(DOMAIN_PLACEHOLDER, domain)
    if pair is not None and pair.vip.version == 6:
        # The IPv4 wildcard would refuse carriers calling the shared IPv6 address;
        # "[::]" takes both families on one socket.
        config_text = _IPV4_WILDCARD_LISTEN.sub(r'\1"[::]:\2"', config_text)
    maxconn = _default_maxconn(config_text, templates[CONFIG_NAME][0])
    fleet_lines = _fleet_lines(fleet_urls, maxconn)
    fleets_text = _render_fleets(templates[FLEETS_NAME][1], fleet_lines, domain)
    rendered = {CONFIG_NAME: config_text, FLEETS_NAME: fleets_text}
    if pair is not None:
        check = live_check_command(out_dir.absolute() / CONFIG_NAME)
        rendered[KEEPALIVED_NAME] = render_keepalived(
            templates[KEEPALIVED_NAME][1], domain, pair, check
        )
    for name, text in rendered.items():  # e.g. a fleet named "a__B__"
        if survivor := PLACEHOLDER.search(text):
            raise InitError(
                f"{out_dir / name}: placeholder {survivor.group()} would survive rendering; "
                "nothing was written"
            )
    if out_dir.exists() and not out_dir.is_dir():
        raise InitError(
            f"--out {out_dir} is a file, not a directory; give the directory to write "
            "ingress.toml and fleets.txt in; nothing was written"
        )
    targets = {name: out_dir / name for name in rendered}
    if not force and (existing := [str(p) for p in targets.values() if p.exists()]):
        verb = "exists" if len(existing) == 1 else "exist"
        raise InitError(
            f"{' and '.join(existing)} already {verb}; nothing was written. "
            "Pass --force to replace (each old file is kept as NAME.bak.N), or choose another --out"
        )
    _write_all(out_dir, {targets[name]: text for name, text in rendered.items()}, force, backups)
    return list(targets.values())


def _write_all(
    out_dir: Path, texts: dict[Path, str], force: bool, backups: dict[Path, Path] | None
) -> None:
    """Write every file, or none: on a failure (a full disk) what this run wrote is
    taken back and each replaced file restored from its backup. With `force` every
    old file is kept first (keep_numbered_backup), before any is replaced."""
    kept: dict[Path, Path] = {}
    wrote = 0
    existed = {path: path.exists() for path in texts}
    doing = "write"
    path = out_dir
    # The directories this run makes: taken back with the files when it fails.
    made = [d for d in (out_dir, *out_dir.parents) if not d.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if force:
            doing = "keep the old"
            for path, text in texts.items():
                if (backup := keep_numbered_backup(path, text)) is not None:
                    kept[path] = backup
        doing = "write"
        for path, text in texts.items():
            write_atomically(path, text, replace=force, backup=False)
            wrote += 1
    except (OSError, FileExists) as exc:
        left = _take_back(texts, existed, kept)
        if isinstance(exc, FileExists):  # made by someone else since the check above
            what = f"{path} already exists"
        else:
            what = f"cannot {doing} {path}"
            if exc.filename and str(exc.filename) != str(path):
                what += f" ({exc.filename})"
            what += f": {exc.strerror or exc}"
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if isinstance(exc, FileExists):
            fix = "pass --force to replace it, or choose another --out"
        elif full:
            fix = (
                f"free some space or inodes there (df -h {out_dir}, df -i {out_dir}), "
                "then run init again"
            )
        else:
            fix = "fix that, then run init again"
        if not left:
            for directory in made:  # deepest first; one not empty (another's) stays
                with contextlib.suppress(OSError):
                    directory.rmdir()
            done = "nothing was written" if not (wrote or kept) else "nothing was changed"
            undone = " (what this run wrote is taken back)" if wrote or kept else ""
            raise InitError(f"{what}; {done}{undone}; {fix}") from None
        raise InitError(
            f"{what}; could not take back what this run wrote: {'; '.join(left)}; "
            f"{fix}{'' if isinstance(exc, FileExists) else ' with --force'}"
        ) from None
    except KeyboardInterrupt:  # Ctrl-C half way: as a failure, then interrupted
        if left := _take_back(texts, existed, kept):
            print(f"init: could not take back: {'; '.join(left)}", file=sys.stderr)
        raise
    if backups is not None:
        backups.update(kept)


def _take_back(
    texts: dict[Path, str], existed: dict[Path, bool], kept: dict[Path, Path]
) -> list[str]:
    """Undo a run that failed half way: each file as it was before. Returns what
    could not be undone, one phrase each."""
    left = []
    for path, text in texts.items():
        real = Path(os.path.realpath(path))
        try:
            if (backup := kept.get(path)) is not None:
                if os.path.samefile(backup, real):  # a link to the file, not replaced yet
                    backup.unlink()
                else:
                    try:
                        os.replace(backup, real)  # the old file, as it was
                    except OSError as exc:
                        if exc.errno != errno.EXDEV:
                            raise
                        # The backup sits beside a link to another file system: its
                        # bytes are written back where the link points, then it goes.
                        write_atomically(real, backup.read_text(encoding="utf-8"), backup=False)
                        backup.unlink()
            elif not existed[path] and real.exists() and real.read_text(encoding="utf-8") == text:
                real.unlink()  # written by this run: nothing was there before
        except OSError as exc:
            old = f" (the old one is {kept[path]})" if path in kept else ""
            left.append(f"{path}: {exc.strerror or exc}{old}")
    return left


def render_keepalived(template: str, domain: str, pair: TwoHosts, live_check: str) -> str:
    values = {
        DOMAIN_PLACEHOLDER: domain,
        "__VIRTUAL_ADDRESS__": str(pair.vip),
        "__INTERFACE__": pair.interface,
        "__PEER__": str(pair.peer),
        "__PRIORITY__": str(pair.priority),
        "__VIRTUAL_ROUTER_ID__": str(pair.virtual_router_id),
        "__LIVE_CHECK__": live_check,
        "__SCRIPT_USER__": pair.script_user,
        "__UNICAST_SOURCE__": (
            f"unicast_src_ip {pair.source}"
            if pair.source is not None
            else "# unicast_src_ip: not set (init --source), the primary address"
        ),
    }
    return PLACEHOLDER.sub(lambda m: values.get(m.group(), m.group()), template)


def keepalived_binary() -> str | None:
    # /usr/sbin is not on every PATH (sudo -u, cron), and keepalived lives there.
    return shutil.which("keepalived") or shutil.which("keepalived", path="/usr/sbin:/sbin")


def check_keepalived(path: Path, keepalived: str) -> list[str]:
    """`keepalived -t -f path`: its complaints, one a line (none: it accepts the file).

    It checks the file against this host (the interface exists, script_user
    exists; for a script run as root, that its path is safe), so run it on the
    host the file is for."""
    try:
        done = subprocess.run(
            [keepalived, "-t", "-f", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [f"keepalived -t -f {path}: could not run it: {exc}"]
    said = [
        line.strip()
        for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and line.strip() != "Terminated"
    ]
    if done.returncode in _KEEPALIVED_CLEAN_EXITS and not said:
        return []
    said = said or [f"exit status {done.returncode}"]
    text = "\n".join(said)
    for words, hint in _KEEPALIVED_HINTS.items():
        if words in text:
            said.append(hint)
    return [f"keepalived -t -f {path}: {line}" for line in said]


def check_deployment(config_path: Path) -> DeploymentCheck:
    """Run `fleet-ingress check` on the written files; missing cert/key files are
    sorted out of `problems` (certbot has not issued the certificate yet)."""
    from fleet_ingress.config.check import WARNING, check_configuration
    from fleet_ingress.config.settings import ConfigError, load_config

    lines = check_configuration(config_path)
    missing: list[Path] = []
    expected: list[re.Pattern[str]] = []
    try:
        tls = load_config(config_path).tls
    except ConfigError:
        pass  # check_configuration has reported it
    else:
        for key, path in (("tls.cert", tls.cert), ("tls.key", tls.key)):
            if path is not None and _missing(path):
                missing.append(path)
                # The line check.py writes for a file it cannot open (the
                # line of the file that sets the key, where one does).
                expected.append(
                    re.compile(
                        rf"{re.escape(str(config_path))}(?: line \d+)?: {re.escape(key)}: "
                        rf"cannot read {re.escape(str(path))}: "
                    )
                )
    problems, warnings = [], []
    for line in lines:
        if line.startswith(WARNING):
            warnings.append(line)
        elif not any(pattern.match(line) for pattern in expected):
            problems.append(line)
    return DeploymentCheck(problems, missing, warnings)


def _missing(path: Path) -> bool:
    """No such file (a dangling certbot live/ symlink too); an unreadable one is a real problem."""
    try:
        path.stat()  # follows symlinks
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def normalise_domain(domain: str) -> str:
    """The carrier-facing host name, lower case; InitError when certbot could not
    get an HTTP-01 certificate for it (no IP, no wildcard, at least one dot)."""
    name = domain.strip().lower().removesuffix(".")
    labels = name.split(".")
    if (
        len(name) > 253
        or len(labels) < 2
        or not all(_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise InitError(
            f"--domain {domain!r} is not a DNS name a certificate can be issued for; "
            "give the carrier-facing host name, e.g. --domain calls.example.com"
        )
    return name


def add_init_arguments(parser: argparse.ArgumentParser) -> None:
    """The `init` subcommand's options (SPEC section 8)."""
    parser.add_argument(
        "--domain", required=True, help="the carrier-facing host name, e.g. calls.example.com"
    )
    parser.add_argument(
        "--fleet",
        action="extend",
        nargs="+",
        required=True,
        metavar="URL",
        help="the fleets, https://HOST[:PORT] each: --fleet URL URL... or --fleet URL "
        "--fleet URL (a quoted 'URL name=NAME maxconn=N' sets those too)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("."),
        metavar="DIR",
        help="where to write ingress.toml and fleets.txt (default: the current directory)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace existing files (each old one kept as NAME.bak.N, a backup never replaced)",
    )
    pair = parser.add_argument_group(
        "two hosts sharing one address (keepalived.conf, written beside ingress.toml)"
    )
    pair.add_argument(
        "--vip", metavar="ADDR/PREFIX", help="the shared address carriers call, e.g. 192.0.2.10/24"
    )
    pair.add_argument("--interface", metavar="IF", help="the interface it lives on, e.g. eth0")
    pair.add_argument("--peer", metavar="ADDR", help="the other ingress host's address on IF")
    pair.add_argument(
        "--source",
        metavar="ADDR",
        help="this host's own address on IF, the one the other host's --peer names (needed "
        "with an IPv6 --vip; default for IPv4: the interface's primary address)",
    )
    pair.add_argument(
        "--priority",
        type=int,
        metavar="N",
        help=f"1-254 (default {DEFAULT_PRIORITY}): the higher one takes the address when both "
        "start at the same moment; give the hosts different ones",
    )
    pair.add_argument(
        "--vrid",
        type=int,
        metavar="N",
        help="VRRP virtual router id, 1-255, the same on both hosts (default: the last byte "
        "of --vip); change it if another VRRP router on the network uses it",
    )
    pair.add_argument(
        "--script-user",
        metavar="USER",
        help=f"who keepalived runs the check as (default {DEFAULT_SCRIPT_USER}, the service's "
        "user: it must read ingress.toml)",
    )


def main_init(args: argparse.Namespace, *, template_dir: Path | None = None) -> int:
    """`fleet-ingress init`: 0 written and checked (the certificate may still be
    missing: certbot comes next), 1 written but the check found problems,
    2 nothing written. `args` as parsed by add_init_arguments."""
    made_out = not args.out.exists()  # made by this run: root's, by the umask
    try:
        pair = _pair_from(args)
        backups: dict[Path, Path] = {}
        paths = render_deployment(
            args.domain,
            args.fleet,
            args.out,
            template_dir=template_dir,
            force=args.force,
            pair=pair,
            backups=backups,
        )
    except InitError as exc:
        print(f"fleet-ingress init: {exc}", file=sys.stderr)
        return NOT_WRITTEN
    for path in paths:
        kept = f" (the old one is kept as {backups[path].absolute()})" if path in backups else ""
        print(f"wrote {path.absolute()}{kept}")
    if made_out:
        out = args.out.absolute()
        print(
            f"note: made {out} (mode {out.stat().st_mode & 0o7777:04o}, this user's group): "
            "the service rewrites fleets.txt there on add-fleet, drain and the like, so give "
            f"it the service's group, group-writable: chgrp fleet-ingress {out} && "
            f"chmod 2770 {out} (docs/INSTALL.md section 2)"
        )
    config_path = (args.out / CONFIG_NAME).absolute()
    result = check_deployment(config_path)
    for line in result.warnings:
        print(f"check: {line}")
    if result.missing_certificate:
        files = " and ".join(str(p) for p in result.missing_certificate)
        print(
            f"check: no certificate yet at {files}: expected until certbot has issued it "
            "(docs/INSTALL.md, 'First certificate')"
        )
    problems = list(result.problems)
    again = [f"fleet-ingress check -c {config_path}"] if problems else []
    if pair is not None:
        said = _report_keepalived(args.out / KEEPALIVED_NAME)
        if said:  # `check` does not read keepalived.conf: name what does
            again.append(f"keepalived -t -f {(args.out / KEEPALIVED_NAME).absolute()}")
        problems += said
    if problems:
        for line in problems:
            print(f"check: {line}")
        print(
            f"fleet-ingress init: written, but check found {len(problems)} problem(s); "
            f"fix them, then run: {' and '.join(again)}",
            file=sys.stderr,
        )
        return CHECK_FAILED
    if result.missing_certificate:
        print(f"next: issue the certificate, then run: fleet-ingress check -c {config_path}")
    else:
        print(
            "check: OK; start it: systemctl start fleet-ingress, "
            f"or fleet-ingress run -c {config_path}"
        )
    return OK


def _pair_from(args: argparse.Namespace) -> TwoHosts | None:
    given = {"--vip": args.vip, "--interface": args.interface, "--peer": args.peer}
    extras = {
        "--priority": args.priority,
        "--vrid": args.vrid,
        "--script-user": args.script_user,
        "--source": args.source,
    }
    if not any(v is not None for v in given.values()):
        if named := [k for k, v in extras.items() if v is not None]:
            raise InitError(
                f"{' and '.join(named)}: only with --vip, --interface and --peer "
                "(keepalived.conf); nothing was written"
            )
        return None
    if missing := [k for k, v in given.items() if v is None]:
        raise InitError(
            f"keepalived.conf needs --vip, --interface and --peer together; "
            f"{' and '.join(missing)} missing; nothing was written"
        )
    return two_hosts(
        args.vip,
        args.interface,
        args.peer,
        priority=DEFAULT_PRIORITY if args.priority is None else args.priority,
        router_id=args.vrid,
        script_user=args.script_user or DEFAULT_SCRIPT_USER,
        source=args.source,
    )


def _report_keepalived(path: Path) -> list[str]:
    keepalived = keepalived_binary()
    if keepalived is None:
        print(
            f"check: keepalived is not installed here, so {path.absolute()} is unchecked; "
            f"after apt-get install keepalived run: keepalived -t -f {path.absolute()}"
        )
        return []
    problems = check_keepalived(path.absolute(), keepalived)
    if not problems:
        print(f"check: keepalived -t accepts {path.absolute()}")
    return problems


def _read_templates(
    template_dir: Path | None, names: tuple[str, ...] = TEMPLATE_NAMES
) -> dict[str, tuple[str, str]]:
    """name -> (where it came from, text)."""
    packaged = resources.files("fleet_ingress.config") / "templates"
    base: Traversable = template_dir if template_dir is not None else packaged
    templates = {}
    for name in names:
        source = base / name
        try:
            templates[name] = (str(source), source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
            raise InitError(f"{source}: cannot read the template: {reason}") from None
    return templates


def _refuse_unknown_placeholders(templates: dict[str, tuple[str, str]]) -> None:
    found, fills = [], set()
    for name, (source, text) in templates.items():
        filled = KEEPALIVED_FILLED if name == KEEPALIVED_NAME else FILLED
        for lineno, line in enumerate(text.splitlines(), start=1):
            unknown = [m.group() for m in PLACEHOLDER.finditer(line) if m.group() not in filled]
            found += [f"{source} line {lineno}: placeholder {p}" for p in unknown]
            fills.update(filled if unknown else ())
    if found:
        raise InitError(
            "\n".join(found) + f"\ninit fills only {' and '.join(sorted(fills))}; "
            "nothing was written. Replace the placeholder(s) above in the template."
        )


def _default_maxconn(config_text: str, source: str) -> int:
    try:
        data = tomllib.loads(config_text)
    except tomllib.TOMLDecodeError as exc:
        raise InitError(f"{source}: TOML syntax error: {exc}; nothing was written") from None
    # [Fleets] is [fleets], as load_config reads it: a [Fleets] maxconn = 8 was
    # missed, so a --fleet at 16 was written without its maxconn= and served at 8.
    # (Two spellings of the section are load_config's to refuse, at the check.)
    fleets = next((v for k, v in data.items() if k.lower() == "fleets"), {})
    maxconn = fleets.get("maxconn", DEFAULT_MAXCONN) if isinstance(fleets, dict) else None
    if not isinstance(maxconn, int) or isinstance(maxconn, bool) or maxconn < 1:
        raise InitError(f"{source}: fleets.maxconn must be an integer >= 1 (got {maxconn!r})")
    return maxconn


def _fleet_lines(fleet_urls: list[str], maxconn: int) -> str:
    if not fleet_urls:
        raise InitError("give at least one --fleet https://HOST[:PORT]")
    for value in fleet_urls:
        if "\n" in value or "\r" in value or "#" in value:
            raise InitError(f"--fleet {value!r}: give one fleet, URL [name=NAME] [maxconn=N]")
        if not value.split():
            raise InitError("--fleet '': give a fleet URL, https://HOST[:PORT]")
    try:
        specs = parse_fleets_text("\n".join(fleet_urls), default_maxconn=maxconn, source="--fleet")
    except FleetsFileError as exc:
        # Line N of that text is the Nth --fleet.
        message = re.sub(r"^--fleet line (\d+): ", r"--fleet #\1: ", str(exc))
        message = re.sub(r"on line (\d+)", r"of --fleet #\1", message, flags=re.MULTILINE)
        raise InitError(f"{message}; nothing was written") from None
    # Normalised (lower-case host, no trailing "/"); a fleet at the default maxconn gets
    # no maxconn= so it follows fleets.maxconn when that is raised later.
    return format_fleets_text(specs, default_maxconn=maxconn)


def _render_fleets(template: str, fleet_lines: str, domain: str) -> str:
    if FLEETS_PLACEHOLDER not in template:
        # Replace the example's fleet lines, keeping its comments, at the first one's place.
        kept, placed = [], False
        for line in template.splitlines(keepends=True):
            if line.split("#", 1)[0].strip():
                if not placed:
                    kept.append(FLEETS_PLACEHOLDER + "\n")
                    placed = True
                continue
            kept.append(line)
        if not placed:
            if kept and not kept[-1].endswith("\n"):
                kept[-1] += "\n"
            kept.append(FLEETS_PLACEHOLDER + "\n")
        template = "".join(kept)
    # The placeholder stands on a line of its own; fleet_lines ends with "\n".
    text = template.replace(FLEETS_PLACEHOLDER + "\n", fleet_lines)
    return text.replace(FLEETS_PLACEHOLDER, fleet_lines.rstrip("\n")).replace(
        DOMAIN_PLACEHOLDER, domain
    )
