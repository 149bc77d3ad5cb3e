"""`fleet-ingress` command line (SPEC section 8)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from fleet_ingress.release import version_line

if TYPE_CHECKING:  # imported where used: a command starts without the rest
    from fleet_ingress.service.fd_store import HandedBack


# `check`'s argument for the upgrade's trial run (service.upgrade's _TRIAL
# passes it where the installed release has this name): the files judged
# alone, neither the running service nor the resolver asked (run_check's asks).
CHECK_TRIAL_ARGUMENT = "--trial"


class _VersionAction(argparse.Action):
    """--version: the code's digest is read only when asked (every command,
    `check --live` each second, builds this parser)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(version_line())
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """No abbreviated options: `remove-fleet a --forc` was taken as --force."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


# What the admin socket reads of a request's line (aiohttp's limit, 8190 bytes):
# past it a fleet name, a bot id, a call id or a reason was answered "Got more
# than 8190 bytes when reading: bytearray(b'/fleets/aaaa...')" (the
# operator-input audit of session 38). Each is refused here, by its own bound.
_MAX_CALL_ID = 64  # PID-N-TAG: some 20 characters
# A bot id is what a call's path holds after its prefix: up to limits.max_header_bytes
# (16 KiB by default), so a token of a few KiB is a bot id the ingress carries. Its
# bound here is what the admin socket's request line holds of it as the query
# writes it (urlencode), the other filters' room left: 2048 characters refused
# 3000 of a call being carried (the review of session 38).
_MAX_BOT_QUOTED = 7000


def _fleet_name(text: str) -> str:
    from fleet_ingress.config.fleets_file import MAX_NAME

    if not text:
        raise argparse.ArgumentTypeError(
            "a fleet's name cannot be empty; `fleet-ingress stat` lists the fleets"
        )
    if len(text) > MAX_NAME:
        raise argparse.ArgumentTypeError(
            f"no fleet has a name of {len(text)} characters (one is {MAX_NAME} at most); "
            "`fleet-ingress stat` lists the fleets"
        )
    return text


def _bot_id(text: str) -> str:
    from urllib.parse import quote_plus

    if (quoted := len(quote_plus(text))) > _MAX_BOT_QUOTED:
        raise argparse.ArgumentTypeError(
            f"a bot id of {len(text)} characters is more than --bot asks for ({quoted} "
            f"bytes in the admin socket's request, {_MAX_BOT_QUOTED} at most); "
            "`fleet-ingress calls --json` lists each call's bot id (its first 256 "
            "characters, which --bot takes as well)"
        )
    return text


def _call_id(text: str) -> str:
    if len(text) > _MAX_CALL_ID:
        raise argparse.ArgumentTypeError(
            f"{text[:20]!r}... ({len(text)} characters) is not a call id: a call is named "
            "PID-N-TAG, as `fleet-ingress calls` lists it, e.g. 4242-17-k3f9"
        )
    return text


def _end_reason(text: str) -> str:
    from fleet_ingress.core.call_list import MAX_END_REASON

    if len(text.strip()) > MAX_END_REASON:
        raise argparse.ArgumentTypeError(
            f"the reason is {len(text.strip())} characters long; {MAX_END_REASON} at most"
        )
    return text


def _new_fleet_name(text: str) -> str:
    if not text:  # was taken as no name: the fleet got the URL's host[:port], unsaid
        raise argparse.ArgumentTypeError(
            "a fleet's name cannot be empty; leave --name out for the URL's host[:port]"
        )
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:  # nan too
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds above 0 and at most 3600"
        )
    return value


def _age(text: str) -> float:
    from fleet_ingress.core.call_list import FilterError, parse_longer_than

    try:
        return parse_longer_than(text)
    except FilterError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("longer_than ")) from None


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fleet-ingress",
        description="TLS WebSocket ingress that routes carrier calls to voice-call fleets.",
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    run = sub.add_parser("run", help="serve: a supervisor and process.workers worker processes")
    run.add_argument("-c", "--config", type=Path, required=True, help="ingress.toml")

    # Started by `run` only (it hands over the listeners and a channel): not listed.
    worker = sub.add_parser("worker")
    worker.add_argument("-c", "--config", type=Path, required=True)
    worker.add_argument("--generation", type=int, default=1)
    worker.add_argument("--cpu", type=int, default=None)  # process.cpu_affinity

    check = sub.add_parser("check", help="validate the configuration and fleets file")
    check.add_argument("-c", "--config", type=Path, help="ingress.toml")
    check.add_argument(
        "--probe", action="store_true", help="also probe every fleet's health endpoint now"
    )
    check.add_argument(
        "--body",
        type=Path,
        metavar="FILE",
        help="judge a captured /health/fleet body instead (pass/fail and the capacity read)",
    )
    check.add_argument(
        "--before-start",
        action="store_true",
        help="the unit's ExecStartPre: pass when a supervisor that died left its workers "
        "running (it is started again and takes them up with what it ran, not the files)",
    )
    check.add_argument(
        CHECK_TRIAL_ARGUMENT,
        action="store_true",
        help=argparse.SUPPRESS,  # the upgrade's trial run: see config.check.run_check's asks
    )
    check.add_argument(
        "--live",
        action="store_true",
        help="instead: does the ingress running here answer its health route over TLS and "
        "have a fleet UP? (keepalived's track script; one line, exit 0 or 1, under 1 s)",
    )

    def admin_command(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text)
        where = cmd.add_mutually_exclusive_group()
        where.add_argument("-c", "--config", type=Path, help="find the admin socket from this")
        where.add_argument("--admin-socket", type=Path, help="the admin socket's path")
        return cmd

    stat = admin_command("stat", "show fleets and calls, like HAProxy's 'show stat'")
    stat.add_argument("--json", action="store_true", help="the full snapshot as JSON")
    for state, what in (
        ("drain", "stop new calls to a fleet; its calls go on"),
        ("ready", "let a fleet take new calls again"),
        ("maint", "stop new calls and health checks for a fleet; its calls go on"),
    ):
        admin_command(state, what).add_argument("name", type=_fleet_name, help="the fleet's name")
    add = admin_command("add-fleet", "add a fleet live (pre-checked, persisted, rolled back)")
    add.add_argument("url", help="https://HOST[:PORT]")
    add.add_argument("--name", type=_new_fleet_name, help="default: the URL's host[:port]")
    add.add_argument("--maxconn", type=_positive_int, help="default: fleets.maxconn")
    add.add_argument(
        "--admin",
        choices=("drain", "maint"),
        help="add it in this admin state (default: ready); remove-fleet's command to add "
        "a fleet again gives it",
    )
    add.add_argument("--dry-run", action="store_true", help="show what would change")
    remove = admin_command("remove-fleet", "drain a fleet, remove it once idle, persist")
    remove.add_argument("name", type=_fleet_name, help="the fleet's name")
    remove.add_argument("--force", action="store_true", help="close its calls now")
    calls = admin_command(
        "calls",
        "list every live call on the host, oldest first, like HAProxy's 'show sess': "
        "id, generation, age, state, fleet, bot, carrier, route, bytes, quiet",
    )
    calls.description = (
        "One row per live call on the host (every worker; both generations during an "
        "upgrade), oldest first: id (PID-N-TAG: worker pid, call_id and the worker's tag, "
        "as its access line's `call` says), generation, age, state (waiting for a slot / "
        "connecting / tunnel / closing), fleet, bot, carrier address, route, bytes each "
        "way, and how long each side has sent nothing (quiet c/f, at the silence sweep's "
        "resolution). Filters combine. Then the calls ended whose connections are still "
        "closing (stat's 'closing': a close flushed to a peer slow to read or gone, 10 s "
        "at most each), with how long and their end_reason, for end-call ID (--json: "
        "'closing')."
    )
    calls.add_argument("--json", action="store_true", help="the calls as JSON, for scripts")
    calls.add_argument("--fleet", type=_fleet_name, metavar="NAME", help="only this fleet's calls")
    calls.add_argument("--bot", type=_bot_id, metavar="ID", help="only this bot id's calls")
    calls.add_argument(
        "--longer-than",
        type=_age,
        metavar="SECONDS",
        help="only calls older than this",
    )
    end = admin_command(
        "end-call",
        "end one live call as remove-fleet --force would (both sides told 1001 "
        "'ended by operator'); its access line says end_reason admin",
    )
    end.description = (
        "End one live call as remove-fleet --force ends one: in the tunnel both sides get "
        "a WebSocket close 1001 'ended by operator' then the TLS close (cut after 2 s); a "
        "call waiting for its fleet is answered 503. Its fleet slot comes back; its access "
        "line says end_reason admin, detail the --reason. A call ended already whose "
        "connections are still closing (stat's 'closing'; its id as `calls` lists it "
        "below the live calls, its access line's 'call') is cut at once, its line "
        "unchanged. Exit 1 when no call has the id (also when its tag is not its pid's "
        "worker's: the process it ran in is gone, or it is another host's call)."
    )
    end.add_argument(
        "id",
        type=_call_id,
        help="the call's id as `fleet-ingress calls` lists it (its access line's `call`): "
        "PID-N-TAG",
    )
    end.add_argument(
        "--reason",
        type=_end_reason,
        default="",
        help="why, for its access line's detail (200 characters at most)",
    )
    admin_command(
        "reload",
        "reload the configuration, fleets file and certificate as SIGHUP does, and say "
        "how it went: exit 1 when refused (the previous ones serve on)",
    )
    admin_command(
        "upgrade",
        "serve with the code installed now: re-execute the supervisor (same PID), start new "
        "workers on the same listeners, drain the old ones; no call cut (like SIGUSR2)",
    )

    from fleet_ingress.config.init_deploy import add_init_arguments

    add_init_arguments(
        sub.add_parser(
            "init",
            help="write one deployment's ingress.toml and fleets.txt "
            "(and with --vip this host's keepalived.conf)",
        )
    )

    demo = sub.add_parser(
        "demo", help="local fleets + ingress + simulated carrier calls, all on loopback"
    )
    demo.add_argument(
        "--calls",
        type=_positive_int,
        default=6,
        help="simulated carrier calls (default: %(default)s)",
    )
    demo.add_argument(
        "--duration",
        type=_seconds,
        default=3.0,
        help="seconds each call streams (default: %(default)s)",
    )
    demo.add_argument(
        "--profile",
        default="binary",
        choices=["binary", "twilio-like", "exotel"],
        help="carrier audio profile (default: %(default)s)",
    )
    parser.set_defaults(commands=list(sub.choices))
    return parser


def _commands(parser: argparse.ArgumentParser, *, hidden: bool) -> list[str]:
    return [name for name in parser.get_default("commands") if hidden or name != "worker"]


_OWN_OPTIONS = ("-h", "--help", "--version")  # the program's, before any command


def _command_first(given: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`fleet-ingress -c FILE stat` is `fleet-ingress stat -c FILE`.

    Options written before the command go after it: argparse took FILE for the
    command and listed the hidden `worker` among the choices. An option that
    takes a value (any command's) takes the next word, whatever it is; a flag
    takes none. What is left first (a mistyped command) meets main's own
    unknown-command answer.
    """
    valued = _options_with_values(parser)
    at = 0
    while at < len(given) and given[at].startswith("-") and given[at] not in _OWN_OPTIONS:
        option = given[at]
        at += 1
        if option in valued and at < len(given):
            at += 1  # its value (`--config=FILE`, `-cFILE`: one word, not in `valued`)
    if at == 0 or at == len(given):
        return given
    return [given[at], *given[:at], *given[at + 1 :]]


def _options_with_values(parser: argparse.ArgumentParser) -> set[str]:
    """Every command's option strings that take a value (`-c`, `--name`...)."""
    found: set[str] = set()
    for action in parser._actions:  # argparse keeps its subparsers here only
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                for option in command._actions:
                    if option.option_strings and option.nargs != 0:
                        found.update(option.option_strings)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    given = _command_first(list(sys.argv[1:] if argv is None else argv), parser)
    if given:
        from fleet_ingress.service.process_start import first_steps

        first_steps(given[0])  # the console script never runs __main__
    if given and not given[0].startswith("-") and given[0] not in _commands(parser, hidden=True):
        # argparse's own answer listed the hidden `worker` and suggested nothing.
        import difflib

        listed = _commands(parser, hidden=False)
        close = difflib.get_close_matches(given[0], listed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        parser.print_usage(sys.stderr)
        print(
            f"fleet-ingress: unknown command {given[0]!r}; {hint}the commands: "
            f"{', '.join(listed)} (fleet-ingress --help says what each does)",
            file=sys.stderr,
        )
        return 2
    if given and given[0].startswith("-") and given[0] not in _OWN_OPTIONS:
        parser.print_usage(sys.stderr)
        print(
            f"fleet-ingress: no command given; the commands: "
            f"{', '.join(_commands(parser, hidden=False))} (e.g. fleet-ingress stat -c FILE)",
            file=sys.stderr,
        )
        return 2
    args = parser.parse_args(given)
    if args.command in ("run", "worker"):
        return _dispatch(args)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        # Ctrl-C: this command stops asking; what the ingress was asked goes on there.
        after = {
            "upgrade": "; the upgrade goes on in the ingress: `fleet-ingress stat` shows "
            "which generation serves",
            "add-fleet": "; an add-fleet sent goes on in the ingress: `fleet-ingress stat`",
            "reload": "; a reload sent goes on in the ingress: `fleet-ingress stat`",
            "init": "; what it had written is taken back",
        }.get(args.command, "")
        print(f"\nfleet-ingress: {args.command}: interrupted{after}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Its reader went away (`fleet-ingress stat | head -1`): nothing is wrong
        # here. Quiet, as Python's docs advise: the exit's flush must not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _started() -> None:
    """This command's start done (its imports, its configuration read): the
    garbage collector, off since the process started, on again. A worker's
    comes at serving (`service.worker`)."""
    from fleet_ingress.service.start_collector import collector_back_on

    collector_back_on()


def run_worker_command(config_path: Path, generation: int, cpu: int | None) -> int:
    """`worker -c CONFIG --generation N [--cpu C]`: also called by `entry.main`
    with the words the supervisor writes, read without this module's parser."""
    from fleet_ingress.service.worker import run_worker

    config = _worker_config(config_path)
    if config is not None:
        _raise_descriptor_limit(
            config.limits.max_connections, acme=bool(config.listen.acme), warn=False
        )
    return run_worker(config_path, generation, cpu=cpu)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return _run(args.config)
    if args.command == "worker":
        return run_worker_command(args.config, args.generation, args.cpu)
    if args.command == "check":
        if args.live:
            if args.probe or args.body is not None or args.config is None:
                print(
                    "fleet-ingress check: --live asks the running ingress; give it -c CONFIG "
                    "and neither --probe nor --body",
                    file=sys.stderr,
                )
                return 2
            from fleet_ingress.ops.live_check import run_live_check

            return run_live_check(args.config)
        from fleet_ingress.config.check import run_body_check, run_check

        _started()
        if args.body is not None:
            if args.probe:
                print(
                    "fleet-ingress check: --body judges a saved health answer and --probe "
                    "asks the fleets now; give one of them",
                    file=sys.stderr,
                )
                return 2
            return run_body_check(args.body, args.config)
        if args.config is None:
            print("fleet-ingress check: -c CONFIG is required (or --body FILE)", file=sys.stderr)
            return 2
        from fleet_ingress.ops.service_environment import service_environment_lines

        return run_check(
            args.config,
            probe=args.probe,
            before_start=args.before_start,
            running=service_environment_lines,
            asks=not args.trial,
        )
    if args.command == "init":
        from fleet_ingress.config.init_deploy import main_init

        _started()
        return main_init(args)
    if args.command in ADMIN_COMMANDS:
        return _admin(args)
    if args.command == "demo":
        from fleet_ingress.demo import run_demo

        _started()
        return run_demo(calls=args.calls, duration=args.duration, profile=args.profile)
    raise AssertionError(args.command)  # argparse rejects unknown commands


ADMIN_COMMANDS = {
    "stat",
    "drain",
    "ready",
    "maint",
    "add-fleet",
    "remove-fleet",
    "reload",
    "upgrade",
    "calls",
    "end-call",
}


def _admin_socket_leniently(config_path: Path) -> str | None:
    """listen.admin_socket from a config that does not validate as a whole: the
    environment's override, else the file's value (either relative to the file's
    directory, as `run` takes them), else the
    default; None when the file cannot even be read as TOML."""
    import os
    import tomllib

    from fleet_ingress.config.settings import ENV_PREFIX, read_config_text
    from fleet_ingress.ops.admin_client import DEFAULT_ADMIN_SOCKET

    # Names in any case, as `run` (pydantic-settings) reads them.
    wanted = f"{ENV_PREFIX}LISTEN__ADMIN_SOCKET"
    override = next((v for k, v in os.environ.items() if k.upper() == wanted), None)
    if override is not None:
        # Relative to the file's directory, as `run` (load_config) takes it: not
        # to this command's working directory, which asked another socket.
        return str(config_path.absolute().parent / Path(override).expanduser()) if override else ""
    try:
        text = read_config_text(config_path)
    except (OSError, UnicodeDecodeError):
        return None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        # An edit with a syntax error (a reload just refused it): stat and drain
        # are needed most then, and the file's listen.admin_socket, above the
        # error, is read alone (the operator-input audit of session 38).
        if (value := _admin_socket_line(text)) is None:
            return None  # not written above the error: which socket is not known
    else:
        listen = {name.lower(): table for name, table in data.items()}.get("listen")
        value = listen.get("admin_socket") if isinstance(listen, dict) else None  # [Listen] too
    if value is None:
        return str(DEFAULT_ADMIN_SOCKET)
    if not isinstance(value, str):
        return None
    return str(config_path.absolute().parent / Path(value).expanduser()) if value else ""


def _admin_socket_line(text: str) -> object:
    """listen.admin_socket as the line that writes it says, in a file tomllib
    cannot read as a whole; None when no line before the error writes it."""
    import tomllib

    from fleet_ingress.config.key_lines import key_lines

    line = key_lines(text).get(("listen", "admin_socket"))
    if line is None:
        return None
    try:
        value: object = tomllib.loads(text.removeprefix("\ufeff").split("\n")[line - 1])
    except tomllib.TOMLDecodeError:
        return None
    if not isinstance(value, dict):
        return None
    if "admin_socket" in value:  # under [listen]
        return value["admin_socket"]
    listen = {name.lower(): table for name, table in value.items()}.get("listen")
    return listen.get("admin_socket") if isinstance(listen, dict) else None  # listen.admin_socket


def _sighup_under_systemd() -> int | None:
    """`reload` as the unit's ExecReload, with no admin socket to ask (disabled, or
    moved by the file being reloaded): SIGHUP to the service's main process, as the
    unit did before, its outcome in the journal and `stat` only. None outside systemd
    (no $MAINPID): then the caller says the socket cannot be reached."""
    import os
    import signal

    main_pid = os.environ.get("MAINPID", "")
    if not main_pid.isdigit():
        return None
    try:  # the unit's main process must be an ingress: SIGHUP ends most others
        command = Path(f"/proc/{main_pid}/cmdline").read_bytes()
    except OSError:
        return None
    if b"fleet_ingress" not in command and b"fleet-ingress" not in command:
        return None
    try:
        os.kill(int(main_pid), signal.SIGHUP)
    except OSError as exc:
        print(f"fleet-ingress: cannot signal MAINPID {main_pid}: {exc.strerror}", file=sys.stderr)
        return 2
    print(
        f"fleet-ingress: the admin socket could not be asked: sent SIGHUP to {main_pid}; "
        "whether the reload applied is in the journal and `fleet-ingress stat`",
        file=sys.stderr,
    )
    return 0


def _admin(args: argparse.Namespace) -> int:
    from fleet_ingress.ops.admin_client import DEFAULT_ADMIN_SOCKET, run_admin

    socket_path = args.admin_socket or DEFAULT_ADMIN_SOCKET
    if args.config is not None:
        from fleet_ingress.config.settings import ConfigError, load_config

        try:
            configured = load_config(args.config).listen.admin_socket
        except ConfigError as exc:
            # The file on disk may be broken while the running ingress is fine (a reload
            # was just refused): that is when stat and drain are needed most.
            configured = _admin_socket_leniently(args.config)
            if configured is None:
                print(
                    f"fleet-ingress: {exc}\nfleet-ingress: pass the running ingress's socket "
                    f"with --admin-socket (default {DEFAULT_ADMIN_SOCKET})",
                    file=sys.stderr,
                )
                return 2
            print(
                f"fleet-ingress: note: {args.config} has problems (`fleet-ingress check -c "
                f"{args.config}` lists them); using its admin socket {configured or '(none)'}",
                file=sys.stderr,
            )
        if not configured:
            if args.command == "reload" and (sent := _sighup_under_systemd()) is not None:
                return sent
            print(f"fleet-ingress: {args.config}: listen.admin_socket is disabled", file=sys.stderr)
            return 2
        socket_path = Path(configured)
    _started()
    if args.command == "stat":
        return run_admin(socket_path, "GET", "/stat", None, as_json=args.json)
    if args.command == "calls":
        from fleet_ingress.core.call_list import CallFilter
        from fleet_ingress.ops.admin_client import run_calls

        wanted = CallFilter(fleet=args.fleet, bot=args.bot, longer_than=args.longer_than)
        return run_calls(socket_path, wanted.to_query(), as_json=args.json)
    if args.command == "end-call":
        from fleet_ingress.ops.admin_client import run_end_call

        return run_end_call(socket_path, args.id, args.reason)
    if args.command == "upgrade":
        from fleet_ingress.ops.admin_client import run_upgrade

        return run_upgrade(socket_path)
    if args.command == "reload":
        from fleet_ingress.ops.admin_client import run_reload

        # Not reached (the socket moved in the file being reloaded, or is gone):
        # under systemd, reload as the unit did before.
        return run_reload(socket_path, not_reached=_sighup_under_systemd)
    if args.command in ("drain", "ready", "maint"):
        return run_admin(
            socket_path,
            "POST",
            f"/fleets/{quote(args.name, safe='')}/state",
            {"state": args.command},
        )
    if args.command == "add-fleet":
        payload = {
            "url": args.url,
            "name": args.name,
            "maxconn": args.maxconn,
            "dry_run": args.dry_run,
            **({"admin": args.admin} if args.admin else {}),
        }
        from fleet_ingress.ops.admin_client import run_add_fleet

        return run_add_fleet(socket_path, payload)
    query = "?force=1" if args.force else ""
    return run_admin(socket_path, "DELETE", f"/fleets/{quote(args.name, safe='')}{query}", None)


def _raise_descriptor_limit(
    max_connections: int, *, acme: bool, warn: bool = True, said: Any = None
) -> list[int] | None:
    """Use every descriptor the hard limit allows: a call holds two (carrier and
    fleet), and running out silently drops new carriers at accept. `warn`: the
    supervisor says it once for its workers, which inherit its limit. Returns
    [limit, needed] when the limit is short; `said`, what the image before an
    upgrade's exec returned: the same shortfall is not said again (it was, at
    every upgrade, for a limit no upgrade changes)."""
    import resource

    from fleet_ingress.net.descriptors import descriptors_short, say_descriptors_short

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    short = descriptors_short(max_connections, acme=acme)
    if short is not None and warn and said != short:
        say_descriptors_short(short, max_connections, acme=acme)
    return short


def _worker_config(config_path: Path):  # type: ignore[no-untyped-def]
    from fleet_ingress.config.settings import ConfigError, load_config

    try:
        return load_config(config_path)
    except ConfigError:
        return None  # run_worker says why


def _take_up_after_crash(
    stored: HandedBack, config: Any, served_as_it_ran: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The sockets and state to start with after the previous supervisor died
    (what systemd's fd store handed back, `stored`): its
    listeners where the configuration still names them, and its workers with
    their calls, its counts and history from its last snapshot
    (`service.fd_store`). `served_as_it_ran`: the snapshot's configuration,
    fleets and certificate are served, not the files."""
    import logging
    import time

    from fleet_ingress.logs import fields
    from fleet_ingress.service.fd_store import crash_state, drop_moved_listeners
    from fleet_ingress.service.sdnotify import Notifier

    sockets = stored.sockets
    notifier = Notifier()
    moved = drop_moved_listeners(sockets, config.listen, notifier)
    # A remove lost to a full notify socket left the moved listener's copy in the
    # store: still counted, and sent by the supervisor's notifier before its first
    # message (it was dropped with this one: the old address stayed bound, held
    # by systemd, until a stop).
    stored.owed = notifier.owed
    notifier.close()
    stored.kept = [
        (name, kept) for name, kept in stored.kept if name not in moved or name in stored.owed
    ]
    snapshot = stored.snapshot
    carried = crash_state(sockets, config.process.worker_count(), snapshot)
    log = logging.getLogger("fleet_ingress.lifecycle")
    listeners = sorted(name for name in sockets if name.startswith("listen."))
    if carried is None:  # after a stop (`systemctl restart`), or all its workers gone too
        log.info(
            "listeners taken from systemd's fd store",
            extra=fields(listeners=listeners, listeners_moved=moved),
        )
        return sockets, None
    workers = carried["workers"]
    if snapshot is None:
        what = "fleet health is probed afresh and counters start again"
    else:
        what = "its fleets, counters, reloads and upgrades taken up from its last snapshot" + (
            "; it serves the configuration, fleets and certificate the previous one "
            "ran, not the files (a reload applies them)"
            if served_as_it_ran
            else ""
        )
    log.warning(
        "started again after the previous supervisor died: its listeners and workers "
        f"(with their calls) taken up from systemd's fd store; {what}",
        extra=fields(
            workers=[[w["pid"], w["generation"]] for w in workers],
            listeners=listeners,
            listeners_moved=moved,
            snapshot_age_s=None
            if snapshot is None
            else round(time.monotonic() - float(snapshot.get("written_monotonic", 0)), 3),
        ),
    )
    return sockets, carried


def _key_named(exc: Exception, config_path: Path, keys: str) -> Exception:
    """`exc` (a TLSSetupError naming the files) naming the configuration's keys
    too, as `check` words it: `run` said "certificate /etc/.../fullchain.pem and
    key ... do not match", not which setting to change (the CLI text audit)."""
    text = str(exc)
    if text.startswith(keys.split(",")[0]):  # "tls.cert and tls.key must be set ..."
        return exc
    return type(exc)(f"{config_path}: {keys}: {text}")


def _run(config_path: Path) -> int:
    from fleet_ingress.service.reexec_steps import collector_off_over_exec, step_done

    step_done("python started")  # after an upgrade's exec: the interpreter, cli's imports
    over_exec = collector_off_over_exec()  # until the slot table grants again (Supervisor.start)
    import signal

    from fleet_ingress.net import event_loop

    # SIGUSR2 (upgrade) before the supervisor's handler is in place would end
    # the process (its default action): ignored until then.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)

    from fleet_ingress.config.fleets_file import FleetsFileError, load_fleets_file
    from fleet_ingress.config.settings import ConfigError, TimeoutsSection, load_config
    from fleet_ingress.logs import configure_logging
    from fleet_ingress.net.tls import TLSSetupError, fleet_ssl_context
    from fleet_ingress.service.carrier_certificate import (
        carrier_ssl_context,
        kept_certificate,
        kept_over_unloadable,
    )
    from fleet_ingress.service.fd_store import HandedBack, taken_from_store
    from fleet_ingress.service.listen_fds import ListenFdsError, adopt, worker_key
    from fleet_ingress.service.supervisor import Supervisor
    from fleet_ingress.service.supervisor_process import run_supervisor
    from fleet_ingress.service.upgrade import (
        REEXEC_READ_EVERY,
        REEXEC_READ_PATIENCE,
        drain_children,
        running_from_json,
        served_pem,
        take_state,
    )
    from fleet_ingress.service.worker_pool import WorkerStartError

    step_done("imports")
    if not over_exec:
        _started()
    unreadable = (ConfigError, FleetsFileError, TLSSetupError, ValueError)
    try:
        # After an upgrade's re-execution: the previous image's sockets and state.
        handed, carried = adopt(), take_state()
    except (ListenFdsError, ValueError) as exc:
        print(f"fleet-ingress: {exc}", file=sys.stderr)
        return 2
    # Started again by systemd after the previous supervisor died: its listeners,
    # its workers' channels and its last snapshot, from the fd store
    # (service/fd_store.py). It serves what the dead one ran, as that one
    # checked it: a crash applies no edit and no certificate a reload refused,
    # and files being written meanwhile do not keep it from starting.
    # Only with workers taken up: after a stop (a `systemctl restart` keeps the
    # store) or when they died with it, this is a start like any other.
    from_store = not handed and carried is None
    stored = taken_from_store() if from_store else HandedBack()
    ran = None
    if stored.snapshot is not None and any(worker_key(name) for name in stored.sockets):
        ran = running_from_json(stored.snapshot, base_dir=config_path.absolute().parent)
    # After the exec the workers serve on and carriers wait in the listeners'
    # backlog, but an image that cannot read its files exits, and the host
    # with it: a file being rewritten in place (a `cp` in a certbot hook, an
    # editor, config management) is read again for a while first.
    give_up_at = time.monotonic() + (REEXEC_READ_PATIENCE if carried is not None else 0)
    retrying = False
    pem = None  # None: the Supervisor reads it from the files
    unread_files: str | None = None
    # The certificate the previous process served (after a stop, a crash with no
    # worker left, an upgrade's exec): one on disk that a reload would refuse
    # does not replace it (a restart must not take every carrier's call down
    # for a renewal gone wrong that the reload refused).
    before = stored.served_before_stop or served_pem(
        stored.snapshot if carried is None else carried
    )
    kept_because = None
    if ran is not None:
        config, fleets, pem = ran
    while ran is None:
        empty = False
        pem, kept_because = None, None
        try:
            config = load_config(config_path)
            fleets = load_fleets_file(config.fleets.file, default_maxconn=config.fleets.maxconn)
            try:
                carrier_ssl_context(config)
            except TLSSetupError as exc:  # cannot serve: a reload refuses it too
                named = _key_named(exc, config_path, "tls.cert, tls.key")
                # After an exec, read again for a while first (being written?).
                if before is None or time.monotonic() < give_up_at:
                    raise named from None
                if (kept := kept_over_unloadable(config, before, exc)) is None:
                    raise named from None
                pem, kept_because = before, kept
            try:
                fleet_ssl_context(verify=config.fleets.verify, ca_file=config.fleets.ca_file)
            except TLSSetupError as exc:
                raise _key_named(exc, config_path, "fleets.ca_file") from None
            empty = carried is not None and not fleets  # this read: a file listing none
            if empty:
                # Truncated by whoever is writing it (a reload refuses a file
                # that lists none); still empty at the end, what the previous
                # image ran is served, or, if it ran none either (or did not
                # say), the file is taken as meant.
                raise FleetsFileError(f"{config.fleets.file}: no fleets listed")
            break
        except unreadable as exc:
            if time.monotonic() >= give_up_at:
                running = None
                if carried is not None:
                    running = running_from_json(carried, base_dir=config_path.absolute().parent)
                if running is None or (empty and not running[1]):
                    if empty:
                        break  # as read: a file listing none, the previous image none either
                    print(f"fleet-ingress: {exc}", file=sys.stderr)
                    if carried is not None:  # every worker carries calls: drained, not cut
                        # (no configuration read: timeouts.drain's default)
                        drain_children(handed, TimeoutsSection().drain)
                    return 2
                # Every worker carries calls, and this process is the unit's main
                # one: it serves on with what the previous image ran, as checked
                # there, rather than exit and take every call on the host with it.
                config, fleets, pem = running
                unread_files = str(exc)
                break
            if not retrying:
                print(
                    f"fleet-ingress: after the upgrade's re-execution: {exc}; reading again "
                    f"for up to {REEXEC_READ_PATIENCE:g} s (a file being written?)",
                    file=sys.stderr,
                )
            retrying = True
            time.sleep(REEXEC_READ_EVERY)
    step_done("files read")
    # The files were read: a certificate there that a reload would refuse (expired,
    # not valid yet, for other names) does not replace the one served before.
    if ran is None and unread_files is None and kept_because is None and before is not None:
        if kept_because := kept_certificate(config, before):
            pem = before
    try:
        configure_logging(config.log.level, config.log.format, pid=True)
        stored.say_unused()
        after_crash = False  # workers taken up from the fd store
        if stored.sockets or stored.snapshot is not None:
            handed, carried = _take_up_after_crash(stored, config, ran is not None)
            after_crash = carried is not None
        if not fleets:  # `check` and a reload refuse it; a start serves the :80 renewals
            import logging

            from fleet_ingress.logs import fields

            logging.getLogger("fleet_ingress.server").warning(
                "no fleets listed: every call gets 503 until `fleet-ingress add-fleet URL` "
                "adds one, or the file lists one and is reloaded",
                extra=fields(key="fleets.file", file=str(config.fleets.file)),
            )
        if unread_files is not None:
            import logging

            from fleet_ingress.logs import fields

            logging.getLogger("fleet_ingress.lifecycle").error(
                "after the upgrade's re-execution the files could not be read: serving the "
                "configuration, fleets and certificate the previous image ran; fix the files, "
                "then reload",
                extra=fields(error=unread_files, config=str(config_path)),
            )
        supervisor = Supervisor(
            config, fleets, config_path, handed=handed, carried=carried, pem=pem
        )
        if from_store:  # all systemd keeps is what it handed back
            supervisor.store_taken_up.fd_store_kept = {}
            for name, kept in stored.kept:
                supervisor.store_taken_up.fd_store_kept.setdefault(name, []).append(kept)
            supervisor.store_taken_up.fd_store_owed = list(stored.owed)
        if after_crash:  # its workers seal tickets with the dead supervisor's keys
            supervisor.tickets.take_up_ticket_keys(
                stored.ticket_keys, supervisor.config, supervisor.serving_pem
            )
        if kept_because is not None:
            supervisor.say_certificate_kept(kept_because)
        if unread_files is not None:
            supervisor.start_notes.append(
                f"the files could not be read ({unread_files}): the configuration, fleets "
                "and certificate the previous image ran serve on; fix the files, then reload"
            )
    except (*unreadable, ListenFdsError) as exc:
        print(f"fleet-ingress: {exc}", file=sys.stderr)
        if carried is not None:  # every worker carries calls: drained, not cut
            drain_children(handed, config.timeouts.drain)
        return 2
    except Exception:
        if carried is None:
            raise
        import traceback  # a bug taking up the previous image's state: drained, not cut

        traceback.print_exc()
        drain_children(handed, config.timeouts.drain)
        return 1
    step_done("supervisor built")
    supervisor.descriptors_short = _raise_descriptor_limit(
        config.limits.max_connections,
        acme=bool(config.listen.acme),
        said=None if carried is None or after_crash else carried.get("descriptors_short"),
    )
    try:
        return event_loop.run(run_supervisor(supervisor))
    except WorkerStartError as exc:
        hint = "; its error is in the log above" if exc.error_logged else ""
        print(f"fleet-ingress: cannot start: {exc}{hint}", file=sys.stderr)
        return 1
    except OSError as exc:  # a listener that cannot bind (ListenError says which), most often
        print(f"fleet-ingress: cannot start: {exc}", file=sys.stderr)
        return 1
