"""`fleet-ingress init`: write one deployment's ingress.toml and fleets.txt.

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
import re
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from fleet_ingress.config.atomic import FileExists, write_atomically
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

# A DNS name certbot can get an HTTP-01 certificate for: it becomes a path under
# /etc/letsencrypt/live/ and a TOML string, so nothing else may slip through.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

# Exit statuses of main_init.
OK, CHECK_FAILED, NOT_WRITTEN = 0, 1, 2


class InitError(Exception):
    """Nothing was written; the message says what is wrong and how to fix it."""


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
) -> list[Path]:
    """Write out_dir/ingress.toml and out_dir/fleets.txt; return their paths.

    Each `fleet_urls` item is one fleets-file line, `URL [name=NAME] [maxconn=N]`.
    Raises InitError, with nothing written, on a bad domain or fleet, a surviving
    placeholder, or an existing file when not `force` (with `force` the old file
    is kept as NAME.bak). Each file is replaced atomically.
    """
    domain = normalise_domain(domain)
    templates = _read_templates(template_dir)
    _refuse_unknown_placeholders(templates)
    config_text = templates[CONFIG_NAME][1].replace(DOMAIN_PLACEHOLDER, domain)
    maxconn = _default_maxconn(config_text, templates[CONFIG_NAME][0])
    fleet_lines = _fleet_lines(fleet_urls, maxconn)
    fleets_text = _render_fleets(templates[FLEETS_NAME][1], fleet_lines, domain)
    rendered = {CONFIG_NAME: config_text, FLEETS_NAME: fleets_text}
    for name, text in rendered.items():  # e.g. a fleet named "a__B__"
        if survivor := PLACEHOLDER.search(text):
            raise InitError(
                f"{out_dir / name}: placeholder {survivor.group()} would survive rendering; "
                "nothing was written"
            )
    targets = {name: out_dir / name for name in rendered}
    if not force and (existing := [str(p) for p in targets.values() if p.exists()]):
        verb = "exists" if len(existing) == 1 else "exist"
        raise InitError(
            f"{' and '.join(existing)} already {verb}; nothing was written. "
            "Pass --force to replace (the old file is kept as NAME.bak), or choose another --out"
        )
    written: list[Path] = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in rendered.items():
            try:
                write_atomically(targets[name], text, replace=force)
            except FileExists:
                raise InitError(
                    f"{targets[name]} already exists; pass --force to replace it"
                ) from None
            written.append(targets[name])
    except OSError as exc:
        done = (
            f"; {' and '.join(map(str, written))} written" if written else "; nothing was written"
        )
        raise InitError(
            f"cannot write {exc.filename or out_dir}: {exc.strerror or exc}{done}"
        ) from None
    return written


def check_deployment(config_path: Path) -> DeploymentCheck:
    """Run `fleet-ingress check` on the written files; missing cert/key files are
    sorted out of `problems` (certbot has not issued the certificate yet)."""
    from fleet_ingress.config.check import WARNING, check_configuration
    from fleet_ingress.config.settings import ConfigError, load_config

    lines = check_configuration(config_path)
    missing: list[Path] = []
    expected: set[str] = set()
    try:
        tls = load_config(config_path).tls
    except ConfigError:
        pass  # check_configuration has reported it
    else:
        for key, path in (("tls.cert", tls.cert), ("tls.key", tls.key)):
            if path is not None and _missing(path):
                missing.append(path)
                # The line check.py writes for a file it cannot open.
                expected.add(f"{config_path}: {key}: cannot read {path}: ")
    problems, warnings = [], []
    for line in lines:
        if line.startswith(WARNING):
            warnings.append(line)
        elif not any(line.startswith(prefix) for prefix in expected):
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
        "--force", action="store_true", help="replace existing files (keeping NAME.bak)"
    )


def main_init(args: argparse.Namespace, *, template_dir: Path | None = None) -> int:
    """`fleet-ingress init`: 0 written and checked (the certificate may still be
    missing: certbot comes next), 1 written but the check found problems,
    2 nothing written. `args` as parsed by add_init_arguments."""
    try:
        paths = render_deployment(
            args.domain, args.fleet, args.out, template_dir=template_dir, force=args.force
        )
    except InitError as exc:
        print(f"fleet-ingress init: {exc}", file=sys.stderr)
        return NOT_WRITTEN
    for path in paths:
        print(f"wrote {path.absolute()}")
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
    if not result.ok:
        for line in result.problems:
            print(f"check: {line}")
        print(
            f"fleet-ingress init: written, but check found {len(result.problems)} problem(s); "
            f"fix them, then run: fleet-ingress check -c {config_path}",
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


def _read_templates(template_dir: Path | None) -> dict[str, tuple[str, str]]:
    """name -> (where it came from, text)."""
    packaged = resources.files("fleet_ingress.config") / "templates"
    base: Traversable = template_dir if template_dir is not None else packaged
    templates = {}
    for name in TEMPLATE_NAMES:
        source = base / name
        try:
            templates[name] = (str(source), source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
            raise InitError(f"{source}: cannot read the template: {reason}") from None
    return templates


def _refuse_unknown_placeholders(templates: dict[str, tuple[str, str]]) -> None:
    found = []
    for source, text in templates.values():
        for lineno, line in enumerate(text.splitlines(), start=1):
            found += [
                f"{source} line {lineno}: placeholder {match.group()}"
                for match in PLACEHOLDER.finditer(line)
                if match.group() not in FILLED
            ]
    if found:
        raise InitError(
            "\n".join(found) + f"\ninit fills only {' and '.join(FILLED)}; nothing was written. "
            "Replace the placeholder(s) above in the template."
        )


def _default_maxconn(config_text: str, source: str) -> int:
    try:
        fleets = tomllib.loads(config_text).get("fleets", {})
    except tomllib.TOMLDecodeError as exc:
        raise InitError(f"{source}: TOML syntax error: {exc}; nothing was written") from None
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
