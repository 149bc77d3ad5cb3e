import io
import os
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme

from fleet_ingress.config.check import WARNING, check_configuration, run_check
from fleet_ingress.config.settings import IngressConfig, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "ingress.toml"
GOOD_TOML = """\
[listen]
admin_socket = ""
[tls]
cert = "cert.pem"
key = "key.pem"
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("FLEET_INGRESS_"):
            monkeypatch.delenv(name)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def deployment(tmp_path: Path, ca: trustme.CA) -> Path:
    """A valid config directory: cert and key, one fleet; returns the config path."""
    leaf = ca.issue_cert("calls.example.com")
    leaf.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    leaf.private_key_pem.write_to_path(tmp_path / "key.pem")
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
    (path.parent / "cert.pem").unlink()


def mismatched_key(path: Path) -> None:
    trustme.CA().issue_cert("other.example.com").private_key_pem.write_to_path(
        path.parent / "key.pem"
    )


def bad_fleet_url(path: Path) -> None:
    append(path.parent / "fleets.txt", "ftp://fleet2.example.com\n")


def no_fleets(path: Path) -> None:
    (path.parent / "fleets.txt").write_text("# none yet\n")


def missing_fleets_file(path: Path) -> None:
    (path.parent / "fleets.txt").unlink()


def cert_unset(path: Path) -> None:
    path.write_text(GOOD_TOML.replace('cert = "cert.pem"\n', ""))


def missing_ca_file(path: Path) -> None:
    append(path, '[fleets]\nca_file = "fleet-ca.pem"\n')


def bad_listener(path: Path) -> None:
    path.write_text(GOOD_TOML.replace("[listen]\n", '[listen]\nstats = "127.0.0.1"\n'))


BREAKAGES = [
    (unknown_key, "{config}: fleets.maxcon: unknown key 'fleets.maxcon'; did you mean 'maxconn'?"),
    (wrong_type, "{config}: timeouts.connect: 'soon' is a string; write a number, unquoted"),
    (missing_cert, "{config}: tls.cert: cannot read {dir}/cert.pem: No such file or directory"),
    (
        mismatched_key,
        "{config}: tls.cert, tls.key: certificate {dir}/cert.pem and key {dir}/key.pem "
        "do not match",
    ),
    (
        bad_fleet_url,
        "{dir}/fleets.txt line 2: 'ftp://fleet2.example.com' is not an http:// or https:// URL",
    ),
    (no_fleets, "{dir}/fleets.txt: no fleets listed"),
    (missing_fleets_file, "{dir}/fleets.txt: cannot read the fleets file"),
    (cert_unset, "{config}: tls.cert: not set"),
    (missing_ca_file, "{config}: fleets.ca_file: CA file {dir}/fleet-ca.pem cannot be used"),
    (bad_listener, "{config}: listen.stats: address '127.0.0.1' has no port"),
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
    assert line.startswith(f"{WARNING}{deployment}: fleets.verify = false")
    status, output = run(deployment)
    assert status == 0
    assert output.splitlines()[0] == line
    assert output.splitlines()[1].startswith("OK: 1 fleet,")


def test_certificate_near_expiry_warns(deployment: Path, ca: trustme.CA) -> None:
    leaf = ca.issue_cert("calls.example.com", not_after=datetime.now(UTC) + timedelta(days=3))
    leaf.cert_chain_pems[0].write_to_path(deployment.parent / "cert.pem")
    leaf.private_key_pem.write_to_path(deployment.parent / "key.pem")
    (line,) = check_configuration(deployment)
    assert line.startswith(f"{WARNING}{deployment}: tls.cert: ")
    assert "expires in" in line
    assert run(deployment)[0] == 0


def test_example_config_only_lacks_its_certificate_files() -> None:
    placeholder = "/etc/letsencrypt/live/__INGRESS_DOMAIN__"
    assert check_configuration(EXAMPLE) == [
        f"{EXAMPLE}: tls.cert: cannot read {placeholder}/fullchain.pem: No such file or directory",
        f"{EXAMPLE}: tls.key: cannot read {placeholder}/privkey.pem: No such file or directory",
    ]


def test_example_config_spells_out_every_default() -> None:
    written = tomllib.loads(EXAMPLE.read_text())
    for section, field in IngressConfig.model_fields.items():
        keys = set(field.annotation.model_fields)  # type: ignore[union-attr]
        optional = {"ca_file"} if section == "fleets" else set()  # no TOML spelling for None
        assert set(written[section]) == keys - optional, section
    example = load_config(EXAMPLE).model_dump()
    default = load_config(None).model_dump()
    for dump in (example, default):
        dump["tls"].update(cert=None, key=None)
        dump["fleets"]["file"] = Path("fleets.txt").absolute()
    assert example == default
