import io
import os
import socket
import subprocess
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme

from fleet_ingress.config.check import WARNING, check_configuration, run_check
from fleet_ingress.config.cpus import usable_cpus
from fleet_ingress.config.settings import ConfigError, IngressConfig, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "ingress.toml"
GOOD_TOML = """\
[listen]
admin_socket = ""
[tls]
cert = "fullchain.pem"
key = "privkey.pem"
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("FLEET_INGRESS_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def no_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    """check looks the fleets' names up (fleet_lookup): in this process, every
    name resolves at once to no address, so that no test here waits on, or
    reads a warning of, a resolver that is slow or missing (a name that does
    not resolve is said: test_a_fleet_name_that_does_not_resolve_is_a_warning).
    The `check` commands run as processes below meet the real one."""

    def unknown(host: str, port: int) -> set[tuple[str, int, int]]:
        return set()

    monkeypatch.setattr("fleet_ingress.config.fleet_lookup.resolve", unknown)


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    """A root CA in "the system trust store": OpenSSL reads SSL_CERT_FILE as its
    default bundle, so a client with default certificates trusts it (and the
    public roots in the default directory still)."""
    root = trustme.CA()
    root.cert_pem.write_to_path(tmp_path / "system-roots.pem")
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "system-roots.pem"))
    return root


@pytest.fixture
def ca(root: trustme.CA) -> trustme.CA:
    """The issuing intermediate, as Let's Encrypt's R10 or E5 under ISRG Root X1."""
    return root.create_child_ca()


def write_certbot_files(directory: Path, leaf: trustme.LeafCert) -> None:
    """certbot's live/ files: cert.pem (leaf alone), chain.pem, fullchain.pem, privkey.pem."""
    leaf_pem, *intermediates = (blob.bytes() for blob in leaf.cert_chain_pems)
    (directory / "cert.pem").write_bytes(leaf_pem)
    (directory / "chain.pem").write_bytes(b"".join(intermediates))
    (directory / "fullchain.pem").write_bytes(leaf_pem + b"".join(intermediates))
    leaf.private_key_pem.write_to_path(directory / "privkey.pem")


@pytest.fixture
def deployment(tmp_path: Path, ca: trustme.CA) -> Path:
    """A valid config directory: certbot's files (fullchain.pem used), one fleet;
    returns the config path."""
    write_certbot_files(tmp_path, ca.issue_cert("calls.example.com"))
    (tmp_path / "fleets.txt").write_text("https://fleet1.example.com\n")
    path = tmp_path / "ingress.toml"
    path.write_text(GOOD_TOML)
    return path


def run(path: Path) -> tuple[int, str]:
    out = io.StringIO()
    return run_check(path, out), out.getvalue()


def test_good_config_passes(deployment: Path) -> None:
    assert check_configuration(deployment) == []
    assert run(deployment) == (
        0,
        "OK: 1 fleet, listening on wss 0.0.0.0:443, acme 0.0.0.0:80, stats 127.0.0.1:8404\n",
    )


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def unknown_key(path: Path) -> None:
    append(path, "[fleets]\nmaxcon = 32\n")


def wrong_type(path: Path) -> None:
    append(path, '[timeouts]\nconnect = "soon"\n')


def missing_cert(path: Path) -> None:
    (path.parent / "fullchain.pem").unlink()


def mismatched_key(path: Path) -> None:
    trustme.CA().issue_cert("other.example.com").private_key_pem.write_to_path(
        path.parent / "privkey.pem"
    )


def bad_fleet_url(path: Path) -> None:
    append(path.parent / "fleets.txt", "ftp://fleet2.example.com\n")


def no_fleets(path: Path) -> None:
    (path.parent / "fleets.txt").write_text("# none yet\n")


def missing_fleets_file(path: Path) -> None:
    (path.parent / "fleets.txt").unlink()


def cert_unset(path: Path) -> None:
    path.write_text(GOOD_TOML.replace('cert = "fullchain.pem"\n', ""))


def missing_ca_file(path: Path) -> None:
    append(path, '[fleets]\nca_file = "fleet-ca.pem"\n')


def bad_listener(path: Path) -> None:
    path.write_text(GOOD_TOML.replace("[listen]\n", '[listen]\nstats = "127.0.0.1"\n'))


def admin_socket_under_a_file(path: Path) -> None:
    path.write_text(
        GOOD_TOML.replace('admin_socket = ""', 'admin_socket = "fleets.txt/admin.sock"')
    )


BREAKAGES = [
    (
        unknown_key,
        "{config} line 7: fleets.maxcon: unknown key 'fleets.maxcon'; did you mean 'maxconn'?",
    ),
    (
        wrong_type,
        "{config} line 7: timeouts.connect: 'soon' is a string; write a number of seconds, "
        "unquoted, e.g. 10",
    ),
    (
        missing_cert,
        "{config} line 4: tls.cert: cannot read {dir}/fullchain.pem: No such file or directory",
    ),
    (
        mismatched_key,
        "{config} line 4: tls.cert, tls.key: certificate {dir}/fullchain.pem and key "
        "{dir}/privkey.pem do not match",
    ),
    (
        bad_fleet_url,
        "{dir}/fleets.txt line 2: 'ftp://fleet2.example.com' is not an http:// or https:// URL",
    ),
    (no_fleets, "{dir}/fleets.txt: no fleets listed"),
    (missing_fleets_file, "{dir}/fleets.txt: cannot read the fleets file"),
    (cert_unset, "{config}: tls.cert: not set"),
    (missing_ca_file, "{config} line 7: fleets.ca_file: CA file {dir}/fleet-ca.pem cannot be used"),
    (bad_listener, "{config} line 2: listen.stats: address '127.0.0.1' has no port"),
    (
        admin_socket_under_a_file,
        "{config} line 2: listen.admin_socket = '{dir}/fleets.txt/admin.sock': {dir}/fleets.txt "
        "is a file where its directory goes",
    ),
]


@pytest.mark.parametrize(
    ("breakage", "expected"), [pytest.param(*case, id=case[0].__name__) for case in BREAKAGES]
)
def test_check_rejects_and_names_the_problem(
    deployment: Path, breakage: Callable[[Path], None], expected: str
) -> None:
    breakage(deployment)
    prefix = expected.format(config=deployment, dir=deployment.parent)
    (line,) = check_configuration(deployment)
    assert line.startswith(prefix)
    status, output = run(deployment)
    assert status == 1
    assert output == f"{line}\ncheck failed: 1 problem(s)\n"


def test_verify_false_warns_but_passes(deployment: Path) -> None:
    append(deployment, "[fleets]\nverify = false\n")
    (line,) = check_configuration(deployment)
    assert line.startswith(f"{WARNING}{deployment} line 7: fleets.verify = false")
    status, output = run(deployment)
    assert status == 0
    assert output.splitlines()[0] == line
    assert output.splitlines()[1].startswith("OK: 1 fleet,")


def test_a_value_from_the_environment_is_named_where_the_file_says_otherwise(
    deployment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An Environment= line left in the unit wins over the file without a word:
    an operator raised fleets.maxconn in the file, check said OK, the reload
    applied nothing, and calls went on being queued at 4 (the config audit of
    session 35). check names the variable, the file's value it hides, and
    where to unset it; a value the file does not set is named too."""
    append(deployment, "[fleets]\nmaxconn = 32\n")
    monkeypatch.setenv("FLEET_INGRESS_FLEETS__MAXCONN", "4")
    monkeypatch.setenv("FLEET_INGRESS_LOG__LEVEL", "debug")
    assert load_config(deployment).fleets.maxconn == 4
    assert check_configuration(deployment) == [
        f"{WARNING}{deployment}: fleets.maxconn = '4' from environment variable "
        "FLEET_INGRESS_FLEETS__MAXCONN, not the file's 32: the environment wins; unset it "
        "where it is set (`systemctl show fleet-ingress -p Environment`, the unit's "
        "Environment= or a drop-in), then restart the service to have the file's (a reload "
        "or an upgrade keeps the environment it started with)",
        f"{WARNING}{deployment}: log.level = 'debug' from environment variable "
        "FLEET_INGRESS_LOG__LEVEL, not the file",
    ]
    status, output = run(deployment)
    assert status == 0 and output.splitlines()[-1].startswith("OK: 1 fleet,")


def test_a_finding_of_a_value_from_a_table_in_the_environment_names_no_line_of_the_file(
    deployment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLEET_INGRESS_TIMEOUTS='{"connect": 200}' sets timeouts.connect as
    FLEET_INGRESS_TIMEOUTS__CONNECT=200 does: its warning named the line of
    the file's `connect = 5` (`ingress.toml line 8: timeouts.connect = 200
    seconds`), a line that says otherwise. The file's keys the table does not
    set keep their line."""
    append(deployment, "[timeouts]\nqueue = 3\nconnect = 5\nrequest = 150\n")
    monkeypatch.setenv("FLEET_INGRESS_TIMEOUTS", '{"connect": 200}')
    assert load_config(deployment).timeouts.connect == 200
    found = check_configuration(deployment)
    assert found[:2] == [
        f"{WARNING}{deployment}: timeouts.connect = 200 seconds: seconds were meant, "
        "not milliseconds?",
        f"{WARNING}{deployment} line 9: timeouts.request = 150 seconds: seconds were meant, "
        "not milliseconds?",
    ], found


def test_kubernetes_service_variables_start_and_are_said_not_read(
    deployment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kubernetes sets FLEET_INGRESS_SERVICE_HOST and its kin in every pod for a
    Service named fleet-ingress: they were refused as "not a section" and the
    ingress would not start. Not ours (no `__`): check says them not read, as a
    typo naming no key, while a FLEET_INGRESS_<SECTION>__<KEY> typo is refused still
    (and FLEET_INGRESS_FLEETS_MAXCONN, a key after one `_`: test_config)."""
    kubernetes = {
        "FLEET_INGRESS_SERVICE_HOST": "10.96.0.12",
        "FLEET_INGRESS_SERVICE_PORT": "443",
        "FLEET_INGRESS_SERVICE_PORT_WSS": "443",
        "FLEET_INGRESS_PORT": "tcp://10.96.0.12:443",
        "FLEET_INGRESS_PORT_443_TCP": "tcp://10.96.0.12:443",
        "FLEET_INGRESS_PORT_443_TCP_PROTO": "tcp",
        "FLEET_INGRESS_PORT_443_TCP_PORT": "443",
        "FLEET_INGRESS_PORT_443_TCP_ADDR": "10.96.0.12",
    }
    for name, value in kubernetes.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FLEET_INGRESS_FLEET_MAXCONN", "4")  # names no key: not read
    assert load_config(deployment).fleets.maxconn == IngressConfig().fleets.maxconn
    assert check_configuration(deployment) == [
        f"{WARNING}environment: FLEET_INGRESS_FLEET_MAXCONN is not read: a setting is "
        "FLEET_INGRESS_<SECTION>__<KEY>, two underscores before the key, e.g. "
        "FLEET_INGRESS_FLEETS__MAXCONN",
        *(
            f"{WARNING}environment: {name} is not read (Kubernetes sets it for a Service "
            "named fleet-ingress)"
            for name in sorted(kubernetes)
        ),
    ]
    status, output = run(deployment)
    assert status == 0 and output.splitlines()[-1].startswith("OK: 1 fleet,")
    monkeypatch.setenv("FLEET_INGRESS_SERVICE__HOST", "10.96.0.12")  # our shape: refused
    with pytest.raises(ConfigError, match="'service' is not a section"):
        load_config(deployment)


def test_an_environment_line_escapes_the_variables_name_and_value(
    deployment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name is read without regard to case, and Unicode's lower case of the
    Kelvin sign is k: FLEET_INGRESS_FLEETS__CAPACITY_\u212aEY sets
    fleets.capacity_key. check printed such a name as it was, and a control
    character in a name not read acted in the terminal or the journal: both
    are escaped, as the value is (1098afe had no test)."""
    monkeypatch.setenv("FLEET_INGRESS_FLEETS__CAPACITY_\u212aEY", "free\x1b[2J")
    monkeypatch.setenv("FLEET_INGRESS_LOG\x1b[31m", "debug")
    assert load_config(deployment).fleets.capacity_key == "free\x1b[2J"
    lines = check_configuration(deployment)
    assert lines == [
        f"{WARNING}{deployment}: fleets.capacity_key = 'free\\x1b[2J' from environment "
        "variable FLEET_INGRESS_FLEETS__CAPACITY_\\u212aEY, not the file",
        f"{WARNING}environment: FLEET_INGRESS_LOG\\x1b[31m is not read: a setting is "
        "FLEET_INGRESS_<SECTION>__<KEY>, two underscores before the key, e.g. "
        "FLEET_INGRESS_FLEETS__MAXCONN",
    ]
    assert all(line.isascii() and line.isprintable() for line in lines)


def test_certificate_near_expiry_warns(deployment: Path, ca: trustme.CA) -> None:
    leaf = ca.issue_cert("calls.example.com", not_after=datetime.now(UTC) + timedelta(days=3))
    write_certbot_files(deployment.parent, leaf)
    (line,) = check_configuration(deployment)
    assert line.startswith(f"{WARNING}{deployment} line 4: tls.cert: ")
    assert "expires in" in line
    assert run(deployment)[0] == 0


def test_an_expired_certificate_warns_saying_when_and_the_fix(
    deployment: Path, ca: trustme.CA
) -> None:
    """Before: "has expired; is renewal working?", neither when nor what to do.
    Still exit 0: the unit's start runs check, and the :80 listener certbot
    renews through must come up (and a fleets-only reload apply) meanwhile."""
    now = datetime.now(UTC).replace(microsecond=0)
    leaf = ca.issue_cert(
        "calls.example.com", not_before=now - timedelta(90), not_after=now - timedelta(2)
    )
    write_certbot_files(deployment.parent, leaf)
    (line,) = check_configuration(deployment)
    when = (now - timedelta(2)).strftime("%Y-%m-%d %H:%M:%S UTC")
    assert line.startswith(
        f"{WARNING}{deployment} line 4: tls.cert: {deployment.parent}/fullchain.pem expired on "
        f"{when}: every carrier's handshake fails with it; renew it (`certbot renew`"
    ), line
    assert line.endswith("then `systemctl reload fleet-ingress`")
    assert run(deployment)[0] == 0


def test_a_certificate_not_valid_yet_warns_naming_the_clock(
    deployment: Path, ca: trustme.CA
) -> None:
    """Said, not refused: `run` starts with it (its :80 listener lets certbot renew);
    a reload refuses it in place of a certificate carriers can use."""
    start = datetime.now(UTC) + timedelta(days=1)
    leaf = ca.issue_cert("calls.example.com", not_before=start, not_after=start + timedelta(90))
    write_certbot_files(deployment.parent, leaf)
    (line,) = check_configuration(deployment)
    assert line.startswith(f"{WARNING}{deployment} line 4: tls.cert: ")
    assert "is not valid until" in line and "clock" in line
    assert run(deployment)[0] == 0


def test_a_short_lived_certificate_not_valid_yet_says_both(
    deployment: Path, ca: trustme.CA
) -> None:
    """A certificate with fewer days than the expiry warning's, on a host whose
    clock is behind: before, only "expires in" (the clock audit of session 19)."""
    start = datetime.now(UTC) + timedelta(hours=1)
    leaf = ca.issue_cert("calls.example.com", not_before=start, not_after=start + timedelta(10))
    write_certbot_files(deployment.parent, leaf)
    not_yet, expires = check_configuration(deployment)
    assert "is not valid until" in not_yet and "clock" in not_yet
    assert "expires in 10 days" in expires


@pytest.mark.parametrize(
    ("section", "names"),
    [
        ("[retry]\nretry_on = [429]\n", ['retry.retry_on lacks "conn-failure"', "add to it"]),
        ("[timeouts]\nconnect = 3000\n", ["timeouts.connect = 3000 seconds", "milliseconds?"]),
        ("[timeouts]\nresponse = 5000\n", ["timeouts.response = 5000 seconds"]),
        # 20000 meant 20 s: 5.5 hours before a dead carrier's call is noticed.
        (
            "[timeouts]\ntcp_user_timeout = 20000\n",
            ["timeouts.tcp_user_timeout = 20000 seconds", "milliseconds?"],
        ),
        (
            "[fleets]\ncheck_interval = 1.0\ncheck_timeout = 5.0\n",
            ["fleets.check_timeout (5 s) is longer than fleets.check_interval (1 s)"],
        ),
        ("[timeouts]\ndrain = 900\n", ["timeouts.drain = 900 s", "TimeoutStopSec=330"]),
    ],
)
def test_a_valid_setting_that_is_likely_a_mistake_is_named_and_passes(
    deployment: Path, section: str, names: list[str]
) -> None:
    """The docs audit of session 12 wrote each of these and got a bare OK: [429]
    alone stopped refused connections being retried elsewhere, milliseconds where
    seconds are meant made every timeout 1,000 times too long."""
    deployment.write_text(deployment.read_text() + "\n" + section)
    (line,) = check_configuration(deployment)
    assert line.startswith(f"{WARNING}{deployment} line ")  # of the key it names
    for name in names:
        assert name in line, line
    assert run(deployment)[0] == 0


def test_a_user_timeout_of_minutes_is_not_taken_for_milliseconds(deployment: Path) -> None:
    """Minutes of tcp_user_timeout are a fair choice (a call held through a
    link down that long): 300 was warned "milliseconds?" as connect's 300 is
    (the review of session 35); 1000 and above still is."""
    deployment.write_text(deployment.read_text() + "\n[timeouts]\ntcp_user_timeout = 300\n")
    assert check_configuration(deployment) == []
    deployment.write_text(deployment.read_text().replace("= 300", "= 1000"))
    (line,) = check_configuration(deployment)
    assert "timeouts.tcp_user_timeout = 1000 seconds" in line and "milliseconds?" in line


def test_auto_workers_whose_cpu_quota_cannot_be_read_are_named(
    deployment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cgroup namespace over the host's cgroupfs whose groups could not be
    found (config/cgroup_files.py): "auto" counts the affinity mask's CPUs, a
    quota there unseen; said, not taken for none (on main: nothing said)."""
    from fleet_ingress.config import check
    from fleet_ingress.core.cpu_quota import AutoWorkers

    why = "a cgroup namespace over a cgroupfs mounted outside it: ..."
    monkeypatch.setattr(check, "usable_cpus", lambda: AutoWorkers(2, None, why))
    base = deployment.read_text()
    deployment.write_text(base + "\n[process]\nworkers = 4\n")
    assert check_configuration(deployment) == []  # a number: no quota needed
    deployment.write_text(base + '\n[process]\nworkers = "auto"\n')
    (line,) = check_configuration(deployment)
    assert f"could not be read ({why})" in line and "counts the 2 CPUs" in line, line
    assert run(deployment)[0] == 0


def test_workers_far_past_the_cpus_are_named_and_pass(deployment: Path) -> None:
    """process.workers = 64 on a host of 2 CPUs passed without a word: the
    workers past the CPUs share them, each its own Python process's memory
    and a channel the supervisor serves, for no more calls (the bounds audit
    of session 35). Twice the CPUs is left alone (a deliberate overcommit)."""
    usable = usable_cpus()  # the affinity mask's, fewer under a CPU quota (a CI container's)
    cpus = usable.count
    base = deployment.read_text()
    deployment.write_text(base + f"\n[process]\nworkers = {2 * cpus}\n")
    assert check_configuration(deployment) == []
    deployment.write_text(base + f"\n[process]\nworkers = {2 * cpus + 1}\n")
    quota = f" ({usable.quota})" if usable.quota else ""
    assert check_configuration(deployment) == [
        f"{WARNING}{deployment} line 8: process.workers = {2 * cpus + 1} is more than twice the "
        f"{cpus} CPU{'' if cpus == 1 else 's'} this process may run on{quota}: the workers past "
        'them share those CPUs, each costing its memory, for no more calls; "auto" is one per CPU'
    ]
    assert run(deployment)[0] == 0


def test_the_defaults_raise_no_doubt(deployment: Path) -> None:
    retry = '[retry]\nretry_on = ["conn-failure", "empty-response", "response-timeout", 429]\n'
    deployment.write_text(deployment.read_text() + "\n" + retry)
    assert check_configuration(deployment) == []


def test_example_config_only_lacks_its_certificate_files() -> None:
    placeholder = "/etc/letsencrypt/live/__INGRESS_DOMAIN__"
    at = {
        line.partition(" = ")[0]: number
        for number, line in enumerate(EXAMPLE.read_text().splitlines(), start=1)
        if line.startswith(("cert = ", "key = "))
    }
    assert check_configuration(EXAMPLE) == [
        f"{EXAMPLE} line {at['cert']}: tls.cert: cannot read {placeholder}/fullchain.pem: No "
        "such file or directory",
        f"{EXAMPLE} line {at['key']}: tls.key: cannot read {placeholder}/privkey.pem: No such "
        "file or directory",
    ]


def test_example_config_spells_out_every_default() -> None:
    written = tomllib.loads(EXAMPLE.read_text())
    for section, field in IngressConfig.model_fields.items():
        keys = set(field.annotation.model_fields)  # type: ignore[union-attr]
        # No TOML spelling for None.
        optional = {"ca_file"} if section in ("fleets", "tls") else set()
        # Unset: upgrade_drain is drain; close_flush is 10 s, or tunnel when shorter.
        optional |= {"upgrade_drain", "close_flush"} if section == "timeouts" else set()
        assert set(written[section]) == keys - optional, section
    example = load_config(EXAMPLE).model_dump()
    default = load_config(None).model_dump()
    for dump in (example, default):
        dump["tls"].update(cert=None, key=None)
        dump["fleets"]["file"] = Path("fleets.txt").absolute()
    assert example == default


# -- the certificate chain (issue #12) --------------------------------------------------


def use_tls(path: Path, cert: str, key: str = "privkey.pem", ca_file: str | None = None) -> None:
    tls = f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'
    if ca_file is not None:
        tls += f'ca_file = "{ca_file}"\n'
    path.write_text(GOOD_TOML.replace('[tls]\ncert = "fullchain.pem"\nkey = "privkey.pem"\n', tls))


def only_problem(path: Path) -> str:
    (line,) = check_configuration(path)
    status, output = run(path)
    assert (status, output) == (1, f"{line}\ncheck failed: 1 problem(s)\n")
    return line


def test_certbots_cert_pem_is_refused_naming_fullchain_pem(deployment: Path) -> None:
    use_tls(deployment, "cert.pem")
    line = only_problem(deployment)
    directory = deployment.parent
    assert line.startswith(
        f"{deployment} line 4: tls.cert: {directory}/cert.pem holds the server's certificate alone"
    )
    assert "is not in the system trust store" in line
    assert f"With certbot, use {directory}/fullchain.pem, not cert.pem" in line


def test_a_fullchain_pem_holding_one_certificate_is_not_told_to_use_fullchain_pem(
    deployment: Path,
) -> None:
    """Told 'With certbot, use .../fullchain.pem, not cert.pem' when tls.cert already
    was fullchain.pem (the docs audit of session 12): it names what is wrong instead."""
    directory = deployment.parent
    (directory / "fullchain.pem").write_bytes((directory / "cert.pem").read_bytes())
    line = only_problem(deployment)
    assert "holds the server's certificate alone" in line
    assert "not cert.pem" not in line
    assert "named fullchain.pem but holds one certificate" in line


def test_a_chain_in_the_wrong_order_is_named_so_not_a_key_mismatch(deployment: Path) -> None:
    directory = deployment.parent
    (directory / "reversed.pem").write_bytes(
        (directory / "chain.pem").read_bytes() + (directory / "cert.pem").read_bytes()
    )
    use_tls(deployment, "reversed.pem")
    line = only_problem(deployment)
    assert line.startswith(
        f"{deployment} line 4: tls.cert, tls.key: certificate {directory}/reversed.pem has its "
        f"certificates in the wrong order: the key {directory}/privkey.pem belongs to "
        "certificate 2 of 2"
    )
    assert "do not match" not in line and "fullchain.pem" in line


def test_intermediates_out_of_order_are_named(deployment: Path, ca: trustme.CA) -> None:
    """root -> ca -> sub -> leaf, written leaf, ca, sub: the leaf is first (so the
    key pairs up) but its issuer does not follow it."""
    leaf = ca.create_child_ca().issue_cert("calls.example.com")
    leaf_pem, sub_pem, ca_pem = (b.bytes() for b in leaf.cert_chain_pems)
    directory = deployment.parent
    (directory / "shuffled.pem").write_bytes(leaf_pem + ca_pem + sub_pem)
    leaf.private_key_pem.write_to_path(directory / "privkey.pem")
    use_tls(deployment, "shuffled.pem")
    line = only_problem(deployment)
    assert line.startswith(
        f"{deployment} line 4: tls.cert: {directory}/shuffled.pem is not in order: "
    )
    assert "certificate 2 (" in line and "did not issue certificate 1 (" in line
    # In order it passes: the same three certificates are a good chain.
    (directory / "shuffled.pem").write_bytes(leaf_pem + sub_pem + ca_pem)
    assert check_configuration(deployment) == []


def test_a_missing_intermediate_between_two_is_named(deployment: Path, ca: trustme.CA) -> None:
    leaf = ca.create_child_ca().issue_cert("calls.example.com")
    leaf_pem, sub_pem, _ = (b.bytes() for b in leaf.cert_chain_pems)
    directory = deployment.parent
    (directory / "fullchain.pem").write_bytes(leaf_pem + sub_pem)
    leaf.private_key_pem.write_to_path(directory / "privkey.pem")
    line = only_problem(deployment)
    assert line.startswith(f"{deployment} line 4: tls.cert: {directory}/fullchain.pem stops at ")
    assert "an intermediate certificate is missing" in line


def test_a_private_ca_passes_once_the_operator_names_it(deployment: Path, ca: trustme.CA) -> None:
    private = trustme.CA()  # not in the (test's) system trust store
    directory = deployment.parent
    leaf = private.issue_cert("calls.example.com")
    leaf.cert_chain_pems[0].write_to_path(directory / "fullchain.pem")
    leaf.private_key_pem.write_to_path(directory / "privkey.pem")
    line = only_problem(deployment)
    assert "set tls.ca_file to its certificate" in line
    private.cert_pem.write_to_path(directory / "carrier-ca.pem")
    use_tls(deployment, "fullchain.pem", ca_file="carrier-ca.pem")
    assert check_configuration(deployment) == []
    # Named, the private CA is what carriers trust: the system's roots no longer count.
    write_certbot_files(directory, ca.issue_cert("calls.example.com"))
    assert f"nor in tls.ca_file {directory}/carrier-ca.pem" in only_problem(deployment)


def test_a_self_signed_certificate_passes_only_when_named(deployment: Path) -> None:
    self_signed = trustme.CA()  # a CA's own certificate is self-signed
    directory = deployment.parent
    self_signed.cert_pem.write_to_path(directory / "self.pem")
    self_signed.private_key_pem.write_to_path(directory / "privkey.pem")
    use_tls(deployment, "self.pem")
    assert f"{directory}/self.pem is self-signed" in only_problem(deployment)
    use_tls(deployment, "self.pem", ca_file="self.pem")
    assert check_configuration(deployment) == []


def test_a_chain_ending_at_an_untrusted_root_is_named(deployment: Path) -> None:
    other_root = trustme.CA()
    leaf = other_root.create_child_ca().issue_cert("calls.example.com")
    directory = deployment.parent
    blobs = [b.bytes() for b in leaf.cert_chain_pems] + [other_root.cert_pem.bytes()]
    (directory / "fullchain.pem").write_bytes(b"".join(blobs))
    leaf.private_key_pem.write_to_path(directory / "privkey.pem")
    line = only_problem(deployment)
    assert f"{directory}/fullchain.pem ends at the root " in line
    assert "which is not in the system trust store" in line


def test_an_unreadable_tls_ca_file_is_named(deployment: Path) -> None:
    use_tls(deployment, "fullchain.pem", ca_file="nope.pem")
    assert only_problem(deployment) == (
        f"{deployment} line 6: tls.ca_file: cannot read {deployment.parent}/nope.pem: "
        "No such file or directory"
    )
    (deployment.parent / "nope.pem").write_text("not a certificate\n")
    assert only_problem(deployment).startswith(
        f"{deployment} line 6: tls.ca_file: CA file {deployment.parent}/nope.pem cannot be used: "
        "it holds no PEM certificate"
    )


@pytest.mark.parametrize("profile", ["intermediate", "modern", "openssl"])
def test_each_tls_profile_passes_check(deployment: Path, profile: str) -> None:
    append(deployment, f'profile = "{profile}"\n')
    assert check_configuration(deployment) == []


def test_an_empty_system_trust_store_is_named_not_blamed_on_the_chain(
    deployment: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host without the ca-certificates package (a minimal image) has no roots at all:
    every good fullchain.pem then reads as "an intermediate is missing", and the operator
    goes hunting for an intermediate that is not missing."""
    empty = tmp_path / "no-roots"
    empty.mkdir()
    monkeypatch.setenv("SSL_CERT_FILE", str(empty / "none.pem"))
    monkeypatch.setenv("SSL_CERT_DIR", str(empty))
    line = only_problem(deployment)
    assert "system trust store is empty" in line and "ca-certificates" in line
    assert f"no {empty}/none.pem, no certificate in {empty}" in line
    assert "intermediate certificate is missing" not in line


@pytest.mark.parametrize(
    ("mix_up", "said"),
    [
        ("a certificate as the key", "the key {dir}/privkey.pem holds a certificate"),
        ("an encrypted key", "the key {dir}/privkey.pem is encrypted"),
        ("no certificate", "the certificate {dir}/fullchain.pem holds no PEM certificate"),
        # The renewal audit of session 33: each was "each must be PEM, and the key
        # not encrypted".
        (
            "an RSA renewal's key beside the ECDSA certificate",
            "{dir}/privkey.pem do not match: the key is not the one the certificate was "
            "issued for (the certificate's key is ECDSA, this key is RSA)",
        ),
        ("a certificate half written", "the certificate {dir}/fullchain.pem is cut short"),
        ("a key half written", "the key {dir}/privkey.pem is cut short"),
    ],
)
def test_a_certificate_or_key_openssl_cannot_take_is_named(
    deployment: Path, mix_up: str, said: str
) -> None:
    """Before: 'cannot be read: each must be PEM, and the key not encrypted', for
    either file (the CLI audit of session 19)."""
    from cryptography.hazmat.primitives import serialization

    d = deployment.parent
    if mix_up == "a certificate as the key":
        (d / "privkey.pem").write_bytes((d / "cert.pem").read_bytes())
    elif mix_up == "an encrypted key":
        key = serialization.load_pem_private_key((d / "privkey.pem").read_bytes(), None)
        (d / "privkey.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
    elif mix_up == "an RSA renewal's key beside the ECDSA certificate":
        renewal = trustme.CA().issue_cert("calls.example.com", key_type=trustme.KeyType.RSA)
        renewal.private_key_pem.write_to_path(d / "privkey.pem")
    elif mix_up.endswith("half written"):
        path = d / ("fullchain.pem" if "certificate" in mix_up else "privkey.pem")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        (d / "fullchain.pem").write_text("not a certificate\n")
    (line,) = check_configuration(deployment)
    assert said.format(dir=d) in line, line


def test_a_key_the_service_cannot_read_is_told_how_to_let_it(
    deployment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(As root here, nothing is unreadable: the OS's answer is stood in for.)"""
    from fleet_ingress.config import check

    key = deployment.parent / "privkey.pem"
    monkeypatch.setattr(check, "_unreadable", lambda p: "Permission denied" if p == key else None)
    (line,) = check_configuration(deployment)
    assert f"tls.key: cannot read {key}: Permission denied; the service's group must read" in line
    assert "chgrp fleet-ingress FILE && chmod 0640 FILE" in line


def test_a_listener_zone_given_as_an_index_no_interface_has_is_a_problem(
    deployment: Path,
) -> None:
    """A numeric zone resolves whatever it is: check said OK and run failed
    "cannot listen: No such device" (the review of session 19)."""
    assert 4242 not in {index for index, _ in socket.if_nameindex()}
    listen = '[listen]\nstats = "[fe80::10%4242]:8404"\n'
    deployment.write_text(deployment.read_text().replace("[listen]\n", listen))
    (line,) = check_configuration(deployment)
    assert "stats = '[fe80::10%4242]:8404': no interface of this machine has index 4242" in line


def test_before_start_passes_a_broken_file_only_with_a_dead_supervisors_workers_left(
    deployment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unit's ExecStartPre (`check --before-start`): a broken file fails a
    start, unless workers of a supervisor that died still run in the unit (the
    supervisor then takes them up with what it ran, not the files): said, and
    passed. Without --before-start, as ever."""
    from fleet_ingress.config import check

    deployment.write_text(deployment.read_text() + "\n[this is not toml\n")
    out = io.StringIO()
    monkeypatch.setattr(check, "workers_left_in_unit", lambda: [])
    assert run_check(deployment, out, before_start=True) == 1
    assert out.getvalue().endswith("check failed: 1 problem(s)\n")
    monkeypatch.setattr(check, "workers_left_in_unit", lambda: [4242, 4243])
    out = io.StringIO()
    assert run_check(deployment, out, before_start=True) == 0
    assert "1 problem(s), but 2 process(es) of a supervisor that died" in out.getvalue()
    assert run(deployment)[0] == 1


def test_before_start_leaves_a_certificate_that_cannot_load_to_the_start(
    deployment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key of another certificate on disk (a renewal copied by hand, which a
    reload refused): the unit's ExecStartPre passes it, saying so, since the
    supervisor keeps serving the certificate it served before a restart (and
    refuses to start without one); with another problem beside it, it fails as
    ever. `check` itself fails."""
    from fleet_ingress.config import check

    monkeypatch.setattr(check, "workers_left_in_unit", lambda: [])
    trustme.CA().issue_cert("calls.example.com").private_key_pem.write_to_path(
        deployment.parent / "privkey.pem"
    )
    out = io.StringIO()
    assert run_check(deployment, out, before_start=True) == 0
    assert "tls.cert, tls.key:" in out.getvalue()
    assert "after a restart it serves the one it served before" in out.getvalue()
    assert run(deployment)[0] == 1
    (deployment.parent / "fleets.txt").write_text("not a url\n")
    out = io.StringIO()
    assert run_check(deployment, out, before_start=True) == 1


def test_a_certbot_link_to_a_renewal_gone_from_archive_names_the_missing_file(
    deployment: Path,
) -> None:
    """certbot's live/ files are symlinks into archive/: one left pointing at a
    file that is gone (archive/ restored from an older backup, cleaned by hand)
    read "cannot read .../live/.../fullchain.pem: No such file or directory",
    though `ls` lists that file, and said no fix (the renewal audit of session
    38). Now it names the link's target that is missing, and what to do."""
    home = deployment.parent
    live, archive = home / "live" / "calls.example.com", home / "archive" / "calls.example.com"
    archive.mkdir(parents=True)
    live.mkdir(parents=True)
    os.replace(home / "privkey.pem", archive / "privkey2.pem")
    (live / "privkey.pem").symlink_to("../../archive/calls.example.com/privkey2.pem")
    (live / "fullchain.pem").symlink_to("../../archive/calls.example.com/fullchain2.pem")
    config = deployment.read_text()
    for name in ("fullchain.pem", "privkey.pem"):
        assert f'"{name}"' in config
        config = config.replace(f'"{name}"', f'"live/calls.example.com/{name}"')
    deployment.write_text(config)
    code, out = run(deployment)
    assert code == 1, out
    (line,) = [line for line in out.splitlines() if "tls.cert" in line]
    assert f"{live / 'fullchain.pem'}" in line, line
    assert f"a link to {archive / 'fullchain2.pem'}, which does not exist" in line, line
    assert "certbot" in line and "reload" in line, line
    assert "tls.key" not in out, out  # the key's link is whole


def test_certbot_links_into_two_renewals_are_named_with_the_fix(
    deployment: Path, ca: trustme.CA
) -> None:
    """live/fullchain.pem a link to renewal 3, live/privkey.pem to renewal 2 (a
    link put back by hand, a swap caught half way): "do not match" named the
    two links and no fix (the renewal audit of session 38). Now it says which
    renewal each links to and to link both to one; a plain key of another
    certificate says to put the certificate's own key in place."""
    home = deployment.parent
    live, archive = home / "live" / "calls.example.com", home / "archive" / "calls.example.com"
    archive.mkdir(parents=True)
    live.mkdir(parents=True)
    os.replace(home / "privkey.pem", archive / "privkey2.pem")
    os.replace(home / "fullchain.pem", archive / "fullchain2.pem")
    renewal = ca.issue_cert("calls.example.com")
    renewal.private_key_pem.write_to_path(archive / "privkey3.pem")
    for blob in renewal.cert_chain_pems:
        blob.write_to_path(archive / "fullchain3.pem", append=True)
    (live / "privkey.pem").symlink_to("../../archive/calls.example.com/privkey2.pem")
    (live / "fullchain.pem").symlink_to("../../archive/calls.example.com/fullchain3.pem")
    config = deployment.read_text()
    for name in ("fullchain.pem", "privkey.pem"):
        config = config.replace(f'"{name}"', f'"live/calls.example.com/{name}"')
    deployment.write_text(config)
    code, out = run(deployment)
    assert code == 1, out
    assert (
        "do not match: the key is not the one the certificate was issued for; they are links "
        "to two renewals (fullchain.pem to fullchain3.pem, privkey.pem to privkey2.pem): link "
        "both to the files of one renewal, then reload"
    ) in out, out
    (live / "privkey.pem").unlink()
    ca.issue_cert("calls.example.com").private_key_pem.write_to_path(archive / "privkey3.pem")
    (live / "privkey.pem").symlink_to("../../archive/calls.example.com/privkey3.pem")
    code, out = run(deployment)
    assert code == 1, out
    assert "put the key issued with this certificate in place, then reload" in out, out
    assert "one N" in out and "two renewals" not in out, out


def test_before_start_leaves_a_chain_carriers_may_not_verify_to_the_start(
    deployment: Path, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewal whose chain this host cannot follow to a root (certbot's cert.pem,
    or an intermediate under a root the host's trust store lacks yet): the unit's
    ExecStartPre used to refuse it, and a `systemctl restart` then failed the
    unit, every call on the host with it, though `run` serves such a chain. It
    passes it now, saying the start decides; `check` itself (the unit's
    ExecReload) still refuses it, and another problem beside it still fails."""
    from fleet_ingress.config import check

    monkeypatch.setattr(check, "workers_left_in_unit", lambda: [])
    use_tls(deployment, "cert.pem")
    out = io.StringIO()
    assert run_check(deployment, out, before_start=True) == 0
    said = out.getvalue()
    assert "holds the server's certificate alone" in said
    assert "carriers may fail to verify the carrier certificate above; left to the start" in said
    assert run(deployment)[0] == 1
    # A tls.ca_file that cannot be read: the chain cannot be judged, left to the start too.
    use_tls(deployment, "fullchain.pem", ca_file=deployment.parent / "missing-ca.pem")
    out = io.StringIO()
    assert run_check(deployment, out, before_start=True) == 0
    assert "tls.ca_file: cannot read" in out.getvalue()
    use_tls(deployment, "cert.pem")
    (deployment.parent / "fleets.txt").write_text("not a url\n")
    out = io.StringIO()
    assert run_check(deployment, out, before_start=True) == 1
    assert out.getvalue().endswith("check failed: 2 problem(s)\n")


@pytest.mark.parametrize("missing", [False, True], ids=["its directory", "a directory above"])
def test_an_admin_socket_directory_this_user_cannot_write_is_a_warning(
    deployment: Path, missing: bool
) -> None:
    """`run` as this user cannot make the socket there ("cannot start:
    listen.admin_socket ... cannot listen"); check said OK. A warning, not a
    problem: check may run as another user than the service. Root without its
    permission-check capabilities stands in for the service's user."""
    closed = deployment.parent / "closed"
    closed.mkdir(mode=0o555)
    socket_path = closed / "sub" / "admin.sock" if missing else closed / "admin.sock"
    deployment.write_text(GOOD_TOML.replace('admin_socket = ""', f'admin_socket = "{socket_path}"'))
    done = _check_without_dac_override(deployment)
    assert done.returncode == 0, done.stdout + done.stderr
    what = f"its directory {socket_path.parent} in {closed}" if missing else f"it in {closed}"
    assert (
        f"{WARNING}{deployment} line 2: listen.admin_socket = '{socket_path}': this user "
        "(root) "
        f"cannot create {what}, so `run` as this user fails" in done.stdout
    ), done.stdout
    assert done.stdout.splitlines()[-1].startswith("OK: 1 fleet")


def test_an_admin_socket_under_a_directory_this_user_cannot_search_is_a_warning(
    deployment: Path,
) -> None:
    """A directory on the way this user cannot enter (the service's own 0700
    state directory, checked by an operator; /home under the unit's
    ProtectHome=): check printed a traceback (Path.exists raises
    PermissionError), and exited 1."""
    closed = deployment.parent / "private"
    closed.mkdir(mode=0o700)
    os.chmod(closed, 0o000)
    socket_path = closed / "run" / "admin.sock"
    deployment.write_text(GOOD_TOML.replace('admin_socket = ""', f'admin_socket = "{socket_path}"'))
    done = _check_without_dac_override(deployment)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        f"{WARNING}{deployment} line 2: listen.admin_socket = '{socket_path}': this user "
        "(root) "
        f"cannot enter {closed}, on the way to {socket_path.parent}, so `run` as this user fails"
        in done.stdout
    ), done.stdout
    assert done.stdout.splitlines()[-1].startswith("OK: 1 fleet")


def _check_without_dac_override(deployment: Path) -> subprocess.CompletedProcess[str]:
    """`fleet-ingress check` as root without its permission-check capabilities:
    what the service's user meets (a directory mode it cannot write)."""
    import shutil
    import sys

    assert shutil.which("setpriv"), "setpriv (util-linux) is needed"
    return subprocess.run(
        [
            *("setpriv", "--bounding-set", "-dac_override,-dac_read_search"),
            *(sys.executable, "-m", "fleet_ingress", "check", "-c", str(deployment)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("linked", [False, True], ids=["the file", "a symlink's target"])
def test_a_fleets_file_directory_this_user_cannot_write_is_a_warning(
    deployment: Path, linked: bool
) -> None:
    """`drain`, `add-fleet` and the like rewrite the fleets file in its
    directory: in one the service cannot write (`init --out` made it root's,
    0755, the docwalk of session 33) `add-fleet` is refused and a drain applies
    unsaved, which a restart forgets; check said OK. A warning, not a problem: check may run as
    another user than the service."""
    closed = deployment.parent / "closed"
    closed.mkdir()
    (closed / "fleets.txt").write_text("https://fleet1.example.com\n")
    closed.chmod(0o555)
    (deployment.parent / "fleets.txt").unlink()
    if linked:
        (deployment.parent / "fleets.txt").symlink_to(closed / "fleets.txt")
    else:
        deployment.write_text(GOOD_TOML + '[fleets]\nfile = "closed/fleets.txt"\n')
    done = _check_without_dac_override(deployment)
    assert done.returncode == 0, done.stdout + done.stderr
    shown = deployment.parent / ("fleets.txt" if linked else "closed/fleets.txt")
    where = deployment if linked else f"{deployment} line 7"  # the default: on no line
    assert (
        f"{WARNING}{where}: fleets.file {shown}: this user (root) cannot write in "
        f"{closed}, so `add-fleet` and `remove-fleet` are refused, and `drain`, `maint` and "
        "`ready` apply but are not saved (a restart forgets them)" in done.stdout
    ), done.stdout
    assert done.stdout.splitlines()[-1].startswith("OK: 1 fleet")
    closed.chmod(0o755)  # writable by its owner again: nothing to say
    done = _check_without_dac_override(deployment)
    assert "fleets.file" not in done.stdout, done.stdout


# -- one fleet host under two names ----------------------------------------------------


def _check_cli(deployment: Path, *wrapper: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """`fleet-ingress check -c CONFIG`, the real command (in `wrapper`, if given)."""
    import sys
    import time

    started = time.monotonic()
    done = subprocess.run(
        [*wrapper, sys.executable, "-m", "fleet_ingress", "check", "-c", str(deployment)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )
    return done, time.monotonic() - started


def test_a_fleet_at_another_fleets_address_under_a_name_is_a_warning_naming_both(
    deployment: Path,
) -> None:
    """localhost:P beside 127.0.0.1:P is one host with two maxconn budgets: it
    took 32 calls where it holds 16 (the rest 429) and was probed twice, and
    check said OK. Only a lookup tells, and two names at one address may be
    distinct hosts behind an SNI router: a warning, check passes."""
    fleets = deployment.parent / "fleets.txt"
    fleets.write_text("https://localhost:18443\nhttps://127.0.0.1:18443\n")
    done, _ = _check_cli(deployment)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        f"{WARNING}{fleets}: fleets 'localhost:18443' (https://localhost:18443) and "
        "'127.0.0.1:18443' (https://127.0.0.1:18443) resolve to one address, "
        "127.0.0.1:18443: if they are one host, it gets two maxconn budgets (16 + 16 calls "
        "where it holds 16: the rest answered 429) and two probes: list it once; if they "
        "are distinct hosts behind one address (routed by TLS SNI), nothing is wrong"
    ) in done.stdout.splitlines(), done.stdout
    assert done.stdout.splitlines()[-1].startswith("OK: 2 fleets")


def test_a_fleet_name_that_does_not_resolve_is_a_warning(deployment: Path) -> None:
    """A typo in a fleet's name (RFC 6761's .invalid never resolves): check
    looked it up, said OK, and the fleet then never came UP. A warning naming
    the fleet, the resolver's words and the fix; check passes (a resolver down
    for a moment must not refuse the unit's reload)."""
    fleets = deployment.parent / "fleets.txt"
    fleets.write_text("http://fleet1.typo.invalid:18101 name=f1\nhttp://127.0.0.1:18102\n")
    done, _ = _check_cli(deployment)
    assert done.returncode == 0, done.stdout + done.stderr
    (line,) = [line for line in done.stdout.splitlines() if "does not resolve" in line]
    assert line.startswith(
        f"{WARNING}{fleets}: fleet 'f1' (http://fleet1.typo.invalid:18101): its name "
        "fleet1.typo.invalid does not resolve ("
    ), done.stdout
    assert line.endswith(
        "): the ingress cannot connect to it, so it stays DOWN and gets no call; check the "
        "name, its DNS record and this host's resolver, or give the fleet's address"
    ), done.stdout
    assert done.stdout.splitlines()[-1].startswith("OK: 2 fleets")


def test_one_host_in_two_literal_spellings_is_named_without_a_lookup(deployment: Path) -> None:
    """0x7f.0.0.1 is 127.0.0.1 to the resolver: a warning naming both fleets
    and the fix (a refusal would stop the reload, or the restart, of a file
    that worked); [0::1] beside [::1] and a trailing dot are refused, naming
    the fix and the line that lists the host already."""
    fleets = deployment.parent / "fleets.txt"
    fleets.write_text("http://0x7f.0.0.1:18443 name=hex\nhttp://127.0.0.1:18443\n")
    done, _ = _check_cli(deployment)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        f"{WARNING}{fleets}: fleets 'hex' (http://0x7f.0.0.1:18443) and '127.0.0.1:18443' "
        "(http://127.0.0.1:18443) are one host, 127.0.0.1:18443: it gets two maxconn "
        "budgets (16 + 16 calls) and two probes; list it once (one line, its maxconn= "
        "raised for more calls)"
    ) in done.stdout.splitlines(), done.stdout
    assert "resolve to one address" not in done.stdout  # said once, not again by the lookup

    fleets.write_text("https://fleet1.example.com\nhttps://Fleet1.Example.COM.:443\n")
    done, _ = _check_cli(deployment)
    assert done.returncode == 1
    assert (
        f"{fleets} line 2: 'https://Fleet1.Example.COM.:443' has 'Fleet1.Example.COM.', "
        "a host name with a trailing dot; write https://fleet1.example.com:443: "
    ) in done.stdout
    assert (
        "and it is already listed on line 1, as fleet 'fleet1.example.com' "
        "(https://fleet1.example.com): one host, one maxconn"
    ) in done.stdout

    fleets.write_text("https://::1:18443\n")
    done, _ = _check_cli(deployment)
    assert done.returncode == 1
    assert (
        f"{fleets} line 1: 'https://::1:18443' is an IPv6 address without brackets; "
        "write https://[::1]:18443 (an IPv6 address in [ ])"
    ) in done.stdout


def _unshare_unavailable() -> str | None:
    """Why `unshare --net --mount` cannot run here, or None."""
    import shutil

    if os.geteuid() != 0:
        return "network and mount namespaces need root"
    if shutil.which("unshare") is None:
        return "no `unshare` command (util-linux)"
    tried = subprocess.run(
        ["unshare", "--net", "--mount", "true"], capture_output=True, text=True, timeout=10
    )
    return f"`unshare --net --mount` failed: {tried.stderr.strip()}" if tried.returncode else None


def test_a_resolver_that_never_answers_holds_check_for_its_budget_only(
    deployment: Path, tmp_path: Path
) -> None:
    """check runs before every reload (ExecReload): its lookups are bounded
    (LOOKUP_BUDGET, 2 s), not the resolver's own timeout (30 s here). In
    network and mount namespaces of its own (unnamed: nothing left behind),
    whose resolver binds 127.0.0.1:53 and never answers; the hosts file
    answers localhost."""
    if (why := _unshare_unavailable()) is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI=true: {why}; CI must run this test", pytrace=False)
        pytest.skip(why)
    fleets = deployment.parent / "fleets.txt"
    fleets.write_text("https://fleet.hang.test\nhttps://localhost:18443\nhttps://127.0.0.1:18443\n")
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:30 attempts:1\n")
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    ready = tmp_path / "resolver-ready"
    silent = (
        "import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"s.bind(('127.0.0.1', 53)); open({str(ready)!r}, 'w').close(); time.sleep(60)"
    )
    script = (
        "ip link set lo up && "
        f"mount --bind {tmp_path / 'resolv.conf'} /etc/resolv.conf && "
        f"mount --bind {tmp_path / 'hosts'} /etc/hosts && "
        f'{{ "$1" -c "{silent}" & }} && '
        f"while [ ! -e {ready} ]; do sleep 0.05; done && "
        '"$@"; status=$?; kill $!; exit $status'  # "$@": check, "$1" its python
    )
    done, took = _check_cli(deployment, "unshare", "--net", "--mount", "sh", "-c", script, "sh")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert (
        f"{WARNING}{fleets}: fleet(s) fleet.hang.test: no answer from the resolver within "
        "2 s, so not compared with the others' addresses (is DNS slow or down? the "
        "ingress resolves a fleet's name each time it connects)"
    ) in lines, done.stdout
    shared = "'localhost:18443' (https://localhost:18443) and '127.0.0.1:18443'"
    assert any(shared in line for line in lines), done.stdout
    # 2 s of lookups, and Python started twice on a loaded host (2 cores, -n 2):
    # held by the resolver it would take its 30 s (glibc's most).
    assert took < 20, took


@pytest.mark.uvloop_only  # the ingress and check run in processes of their own
async def test_check_names_a_listen_address_no_interface_has_and_leaves_a_running_one_be(
    tls_files, roomy_fleet
) -> None:
    """`run` found an address the host lacks only at its bind ("cannot assign
    requested address"): check said OK. Now check binds the address on a port
    the kernel picks, never the one asked: against a running ingress on the
    same address and port, the real CLI still passes (nothing clashes), and
    the ingress goes on serving."""
    import sys

    from tests.support import RunningIngress

    service = await RunningIngress.start(tls_files, [f"{roomy_fleet.url} name=a"], workers=1)
    try:

        async def check(config: Path) -> tuple[int, str]:
            proc = await __import__("asyncio").create_subprocess_exec(
                sys.executable, "-m", "fleet_ingress", "check", "-c", str(config),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await proc.communicate()
            assert proc.returncode is not None
            return proc.returncode, out.decode()

        config = service.home / "ingress.toml"
        code, said = await check(config)
        assert code == 0 and "\nOK: 1 fleet" in "\n" + said, said
        # 192.0.2.1 (TEST-NET-1) is on no interface here; only bound, nothing is sent.
        elsewhere = service.home / "elsewhere.toml"
        elsewhere.write_text(
            config.read_text().replace(f'"127.0.0.1:{service.port}"', f'"192.0.2.1:{service.port}"')
        )
        code, said = await check(elsewhere)
        # A warning: the unit's ExecReload runs check, and an address lost since
        # the start must not refuse a reload (a certificate renewal's) while the
        # socket bound at the start serves on.
        assert code == 0, said
        at = elsewhere.read_text().splitlines().index(f'wss = "192.0.2.1:{service.port}"') + 1
        assert (
            f"warning: {elsewhere} line {at}: listen.wss = '192.0.2.1:{service.port}': cannot "
            "listen: "
            "Cannot assign requested address; no interface of this machine has that address "
            "(`ip addr` lists them): give one it has, or 0.0.0.0 / [::] for all"
        ) in said, said
        assert "a start fails at this bind" in said and "\nOK: 1 fleet" in "\n" + said, said
        assert service.proc.returncode is None
        await service.fleets_up()
    finally:
        await service.finish()
