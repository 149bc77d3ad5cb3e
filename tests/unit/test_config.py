import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from fleet_ingress.config.settings import ConfigError, IngressConfig, config_from_dict, load_config


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("FLEET_INGRESS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ingress.toml"
    path.write_text(text)
    return path


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    return caught.value.problems


def test_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    assert load_config(None).model_dump() == {
        "listen": {
            "wss": "0.0.0.0:443",
            "acme": "0.0.0.0:80",
            "stats": "127.0.0.1:8404",
            "admin_socket": "/run/fleet-ingress/admin.sock",
        },
        "tls": {
            "cert": None,
            "key": None,
            "min_version": "TLSv1.2",
            "profile": "intermediate",
            "ca_file": None,
        },
        "routes": {
            "proxy": ["/ws/", "/exotel/"],
            "health": "/haproxy-health",
            "carrier_silence": {},
            "fleet_silence": {},
        },
        "fleets": {
            "file": tmp_path / "fleets.txt",
            "maxconn": 16,
            "verify": True,
            "ca_file": None,
            "health_path": "/health/fleet",
            "capacity_key": "fleet_available",
            "capacity_aware": True,
            "check_interval": 1.0,
            "check_timeout": 1.0,
            "fall": 2,
            "rise": 2,
        },
        "retry": {"retries": 3, "retry_on": ["conn-failure", "empty-response", "response-timeout"]},
        "timeouts": {
            "connect": 3.0,
            "response": 5.0,
            "request": 10.0,
            "queue": 3.0,
            "tunnel": 3600.0,
            "drain": 300.0,
            "upgrade_drain": None,
            "carrier_silence": 30.0,
            "fleet_silence": 0.0,
            "tcp_user_timeout": 20.0,
            "keepalive_idle": 10.0,
            "keepalive_interval": 5.0,
            "close_flush": 10.0,
        },
        "limits": {
            "max_header_bytes": 16384,
            "max_header_count": 100,
            "max_queue": 256,
            "max_connections": 10000,
            "keepalive_probes": 3,
            "new_connection_share": 0.3,
        },
        "acme": {"upstream": "127.0.0.1:8888", "redirect_https": True},
        "log": {"level": "info", "format": "json", "access": True},
        "process": {
            "workers": "auto",
            "cpu_affinity": "off",
            "accept": "spread",
            "worker_hang_timeout": 60.0,
        },
    }


def test_toml_overrides_only_what_it_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[listen]\nstats = ""\n[fleets]\nmaxconn = 32\nverify = false\n'
        '[timeouts]\nqueue = 0\n[log]\nformat = "text"\n',
    )
    config = load_config(path)
    assert (config.listen.stats, config.listen.wss) == ("", "0.0.0.0:443")
    assert (config.fleets.maxconn, config.fleets.verify, config.fleets.fall) == (32, False, 2)
    assert (config.timeouts.queue, config.timeouts.connect) == (0, 3.0)
    assert config.log.format == "text"


def test_env_beats_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[fleets]\nmaxconn = 8\nfall = 3\n")
    monkeypatch.setenv("FLEET_INGRESS_FLEETS__MAXCONN", "32")
    monkeypatch.setenv("FLEET_INGRESS_ROUTES__PROXY", '["/ws/"]')
    config = load_config(path)
    assert (config.fleets.maxconn, config.fleets.fall) == (32, 3)
    assert config.routes.proxy == ["/ws/"]
    assert config_from_dict({"fleets": {"maxconn": 8}}).fleets.maxconn == 32


def test_an_env_variable_naming_no_section_is_an_error_not_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLEET_INGRESS_FLEET__MAXCONN", "32")  # FLEETS, misspelled
    (line,) = problems({})
    assert line.startswith("environment: FLEET_INGRESS_FLEET__MAXCONN: 'fleet' is not a section")
    assert "listen, tls, routes, fleets" in line and "FLEET_INGRESS_FLEETS__MAXCONN" in line
    monkeypatch.delenv("FLEET_INGRESS_FLEET__MAXCONN")
    monkeypatch.setenv("FLEET_INGRESS_FLEETS__MAXCON", "32")  # a key misspelled: also an error
    assert "maxcon" in "\n".join(problems({}))


def test_a_sections_key_after_one_underscore_is_an_error_not_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLEET_INGRESS_FLEETS_MAXCONN (one `_` before the key) was refused as "not a
    section"; since Kubernetes' FLEET_INGRESS_SERVICE_HOST and kin were let
    through, `run` served the file's maxconn without a word (check alone warned,
    and nothing runs check in a pod). A section's real key is no Kubernetes
    name: refused again, naming the spelling that sets it, in any case."""
    path = write(tmp_path, "[fleets]\nmaxconn = 8\n")
    for name, fix in [
        ("FLEET_INGRESS_FLEETS_MAXCONN", "FLEET_INGRESS_FLEETS__MAXCONN"),
        ("fleet_ingress_timeouts_tcp_user_timeout", "FLEET_INGRESS_TIMEOUTS__TCP_USER_TIMEOUT"),
    ]:
        monkeypatch.setenv(name, "32")
        with pytest.raises(ConfigError) as refused:
            load_config(path)
        assert refused.value.problems == [
            f"environment: {name}: one underscore before the key, so it sets nothing; write {fix}"
        ]
        monkeypatch.delenv(name)
    # Kubernetes' names, and one naming no key, are not settings: not refused.
    monkeypatch.setenv("FLEET_INGRESS_SERVICE_HOST", "10.96.0.12")
    monkeypatch.setenv("FLEET_INGRESS_PORT_443_TCP_PORT", "443")
    # A Service named fleet-ingress-fleets:
    monkeypatch.setenv("FLEET_INGRESS_FLEETS_SERVICE_HOST", "10.96.0.13")
    assert load_config(path).fleets.maxconn == 8


def test_bad_env_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_INGRESS_FLEETS__MAXCONN", "0")
    assert problems({}) == [
        "configuration: fleets.maxconn: must be at least 1 (got '0')"
        " (from environment variable FLEET_INGRESS_FLEETS__MAXCONN)"
    ]
    monkeypatch.setenv("FLEET_INGRESS_ROUTES__PROXY", "/ws/")  # lists come as JSON
    assert "routes" in "\n".join(problems({}))


@pytest.mark.parametrize(
    ("toml", "line"),
    [
        # The docs audit of session 12: pydantic's words, no unit, no meaning of 0.
        (
            "[timeouts]\nqueue = -1\n",
            "timeouts.queue: must be at least 0 seconds (got -1); 0 turns queueing off",
        ),
        ("[timeouts]\nconnect = 0\n", "timeouts.connect: must be more than 0 seconds (got 0)"),
        (
            "[limits]\nmax_header_bytes = 512\n",
            "limits.max_header_bytes: must be at least 1024 (got 512)",
        ),
        (
            '[timeouts]\nconnect = "10s"\n',
            "timeouts.connect: '10s' is a string; write a number of seconds, unquoted, e.g. 10",
        ),
        (
            "[timeouts]\nupgrade_drain = -1\n",
            "timeouts.upgrade_drain: must be at least 0 seconds (got -1); 0 keeps the old "
            "generation's calls until they end",
        ),
        (
            '[timeouts]\nupgrade_drain = "1h"\n',
            "timeouts.upgrade_drain: '1h' is a string; write a number of seconds, unquoted, "
            "e.g. 10",
        ),
    ],
)
def test_a_bound_or_a_unit_is_said_in_an_operators_words(
    tmp_path: Path, toml: str, line: str
) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path} line 2: {line}"]


@pytest.mark.parametrize(
    ("toml", "seconds"),
    [
        ("drain = 120\n", 120.0),  # unset: an upgrade's old generation drains as a stop does
        ("drain = 120\nupgrade_drain = 7200\n", 7200.0),
        ("drain = 120\nupgrade_drain = 0\n", math.inf),  # until its calls end
    ],
)
def test_an_upgrades_old_generation_drains_for_upgrade_drain(
    tmp_path: Path, toml: str, seconds: float
) -> None:
    config = load_config(write(tmp_path, "[timeouts]\n" + toml))
    assert config.timeouts.old_generation_drain() == seconds
    assert config.timeouts.drain == 120.0


def test_log_level_is_taken_in_capitals_as_logging_spells_it(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[log]\nlevel = "INFO"\nformat = "Text"\n'))
    assert (config.log.level, config.log.format) == ("info", "text")


def test_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "maxconn = 4\n[fleets]\nmaxcon = 32\n[fleet]\n[limits]\nfoo = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert sorted(caught.value.problems) == sorted(
        [
            f"{path} line 3: fleets.maxcon: unknown key 'fleets.maxcon'; did you mean 'maxconn'?",
            f"{path} line 1: maxconn: unknown key 'maxconn'; did you mean 'fleets.maxconn'?",
            f"{path} line 4: fleet: unknown key 'fleet'; did you mean 'fleets'?",
            f"{path} line 6: limits.foo: unknown key 'limits.foo'",
        ]
    )


def test_an_unknown_keys_control_characters_are_shown_escaped(tmp_path: Path) -> None:
    """The refusal is printed by reload, kept in stat's warning line and in
    systemd's status: a key's escape sequence or newline must not act there."""
    path = write(tmp_path, '[limits]\n"k\\u001b[8mHIDDEN\\u001b[0m\\nline2" = 1\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path} line 2: limits.k\\x1b[8mHIDDEN\\x1b[0m\\nline2: "
        "unknown key 'limits.k\\x1b[8mHIDDEN\\x1b[0m\\nline2'"
    ]


def test_a_key_written_under_the_wrong_section_names_the_right_one(tmp_path: Path) -> None:
    """The keepalive keys are split (timeouts.keepalive_idle, limits.keepalive_probes),
    so writing one under the other section is an easy slip: the suggestion must be the
    key where it lives, not its neighbour in the wrong section."""
    path = write(tmp_path, "[timeouts]\nkeepalive_probes = 5\n[limits]\ntcp_user_timeout = 10.0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert sorted(caught.value.problems) == sorted(
        [
            f"{path} line 2: timeouts.keepalive_probes: unknown key "
            "'timeouts.keepalive_probes'; did you mean 'limits.keepalive_probes'?",
            f"{path} line 4: limits.tcp_user_timeout: unknown key 'limits.tcp_user_timeout'; "
            "did you mean 'timeouts.tcp_user_timeout'?",
        ]
    )


def test_wrong_type_names_the_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, '[fleets]\nmaxconn = "lots"\n[log]\naccess = "maybe"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path} line 2: fleets.maxconn: 'lots' is a string; write a whole number, unquoted",
        f"{path} line 4: log.access: 'maybe' is a string; write true or false",
    ]


@pytest.mark.parametrize(
    ("toml", "line"),
    [
        # pydantic alone would read these as False, 32, 16 and 1: say what the file means.
        ('[fleets]\nverify = "no"', "fleets.verify: 'no' is a string; write true or false"),
        ('[fleets]\nmaxconn = "32"', "fleets.maxconn: '32' is a string; write a whole number"),
        ("[fleets]\nmaxconn = 16.0", "fleets.maxconn: 16.0 is a decimal number; write a whole"),
        ("[fleets]\nfall = true", "fleets.fall: true is a boolean; write a whole number"),
        ("[fleets]\ncheck_interval = true", "fleets.check_interval: true is a boolean; write"),
        ("[tls]\nmin_version = 1.2", "tls.min_version: 1.2 is a decimal number; write one of"),
        ('[routes]\nproxy = "/ws/"', "routes.proxy: '/ws/' is a string; write a list"),
    ],
)
def test_values_of_the_wrong_toml_type_are_refused(tmp_path: Path, toml: str, line: str) -> None:
    path = write(tmp_path, toml + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{path} line 2: {line}")


def test_a_wrong_type_and_other_problems_are_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, '[fleets]\nmaxconn = "lots"\nmaxcon = 3\ncheck_interval = 1\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    lines = caught.value.problems
    assert lines[0] == (
        f"{path} line 2: fleets.maxconn: 'lots' is a string; write a whole number, unquoted"
    )
    assert any("fleets.maxcon: unknown key" in line for line in lines[1:]), lines
    assert len(lines) == 2  # an int for a float key (check_interval = 1) is fine


def test_toml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "[fleets]\nmaxconn = \n")
    with pytest.raises(ConfigError, match=r"TOML syntax error: .*\(at line 2, column 11\)"):
        load_config(path)


def test_missing_file_is_an_error_not_defaults(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read the configuration file"):
        load_config(tmp_path / "nope.toml")


def test_a_directory_given_as_the_file_is_named_as_one(tmp_path: Path) -> None:
    """`check -c /etc/fleet-ingress` said "no such file" about a directory that exists."""
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert caught.value.problems == [
        f"{tmp_path}: cannot read the configuration file: it is a directory; "
        f"give the TOML file itself, e.g. -c {tmp_path / 'ingress.toml'}"
    ]


@pytest.mark.parametrize("version", ["TLSv1.1", "TLSv1", "SSLv3", "tls1.2"])
def test_min_version_below_the_floor_is_refused(version: str) -> None:
    assert problems({"tls": {"min_version": version}}) == [
        f"configuration: tls.min_version: {version!r} is not allowed: the floor is TLS 1.2; "
        "use 'TLSv1.2' or 'TLSv1.3'"
    ]


def test_min_version_tls13_is_accepted() -> None:
    assert config_from_dict({"tls": {"min_version": "TLSv1.3"}}).tls.min_version == "TLSv1.3"


def test_an_unknown_tls_profile_names_the_three() -> None:
    assert problems({"tls": {"profile": "old"}}) == [
        "configuration: tls.profile: Input should be 'intermediate', 'modern' or 'openssl' "
        "(got 'old')"
    ]


def test_tls_ca_file_is_resolved_beside_the_config(tmp_path: Path) -> None:
    path = tmp_path / "ingress.toml"
    path.write_text('[tls]\nca_file = "carrier-ca.pem"\n')
    assert load_config(path).tls.ca_file == tmp_path / "carrier-ca.pem"


def test_retry_on_is_normalised() -> None:
    retry = config_from_dict(
        {"retry": {"retry_on": ["Conn-Failure", "junk-response", "429", 503, 429]}}
    ).retry
    assert retry.retry_on == ["conn-failure", "junk-response", 429, 503]
    assert retry.retry_conditions == frozenset({"conn-failure", "junk-response"})
    assert retry.retry_statuses == frozenset({429, 503})
    assert config_from_dict({}).retry.retry_statuses == frozenset()  # 429 passes through


@pytest.mark.parametrize("item", ["retry-everything", "200", 399, 600, True, 4.5])
def test_retry_on_refuses_what_it_cannot_do(item: object) -> None:
    (line,) = problems({"retry": {"retry_on": ["conn-failure", item]}})
    assert line.startswith(f"configuration: retry.retry_on: {item!r} is not a retry condition")


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("listen", "wss", ""),
        ("listen", "wss", "0.0.0.0"),
        ("listen", "acme", "[::1]80"),
        ("listen", "stats", "localhost:99999"),
        ("acme", "upstream", "127.0.0.1"),
        ("routes", "proxy", ["/ws"]),
        ("routes", "proxy", []),
        ("routes", "health", "haproxy-health"),
        ("fleets", "maxconn", 0),
        ("fleets", "health_path", "health/fleet"),
        ("fleets", "capacity_key", ""),
        ("fleets", "check_interval", 0),
        ("fleets", "check_timeout", -1),
        ("fleets", "fall", 0),
        ("fleets", "rise", 0),
        ("retry", "retries", -1),
        ("timeouts", "connect", 0),
        ("timeouts", "tunnel", float("inf")),
        ("timeouts", "queue", -1),
        ("limits", "max_header_bytes", 1000),
        ("limits", "max_header_count", 0),
        ("limits", "max_header_count", 100000),
        ("limits", "max_header_count", "100"),
        ("limits", "max_queue", -1),
        ("limits", "max_connections", 0),
        # Past what a real host could want: a typo's extra zeros (the bounds audit).
        ("limits", "max_connections", 1_048_577),
        ("limits", "max_header_bytes", 1_048_577),
        ("fleets", "maxconn", 1_000_001),
        ("process", "workers", 1025),
        ("log", "level", "verbose"),
        ("log", "format", "xml"),
        ("process", "workers", 0),
        ("process", "workers", "many"),
        ("process", "workers", True),
        ("process", "workers", 1.5),
    ],
)
def test_bad_value_is_named(section: str, key: str, value: object) -> None:
    (line,) = problems({section: {key: value}})
    assert line.startswith(f"configuration: {section}.{key}: ")


@pytest.mark.parametrize(
    ("section", "value"),
    [
        ("listen", {"acme": "", "stats": "", "admin_socket": ""}),  # optional listeners off
        ("listen", {"wss": "[::]:8443", "stats": "127.0.0.1:0", "acme": "127.0.0.1:0"}),
        ("timeouts", {"queue": 0}),  # no queueing
        ("limits", {"max_queue": 0}),
        ("retry", {"retries": 0, "retry_on": []}),
        ("process", {"workers": 1}),
        ("process", {"workers": "auto"}),
        ("process", {"workers": 1024}),
        ("limits", {"max_connections": 1_048_576, "max_header_bytes": 1_048_576}),
        ("fleets", {"maxconn": 1_000_000}),
    ],
)
def test_edge_values_are_accepted(section: str, value: dict[str, Any]) -> None:
    config = config_from_dict({section: value})
    assert getattr(config, section).model_dump().items() >= value.items()


def test_listeners_on_one_port_clash() -> None:
    assert problems({"listen": {"acme": "0.0.0.0:443"}}) == [
        "configuration: listen: acme and wss both use port 443; give each its own"
    ]
    assert problems({"listen": {"wss": "127.0.0.1:8404"}}) == [
        "configuration: listen: stats and wss both use port 8404; give each its own"
    ]
    config_from_dict({"listen": {"wss": "127.0.0.1:8443", "stats": "127.0.0.2:8443"}})


def test_health_route_under_a_proxied_prefix_is_refused() -> None:
    (line,) = problems({"routes": {"proxy": ["/"]}})
    assert line.startswith("configuration: routes: health '/haproxy-health' is under")


def test_every_problem_is_reported_at_once() -> None:
    lines = problems({"fleets": {"maxconn": 0, "fall": 0}, "log": {"level": "loud"}})
    assert [line.split(": ")[1] for line in lines] == ["fleets.maxconn", "fleets.fall", "log.level"]


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = conf_dir / "ingress.toml"
    path.write_text(
        '[tls]\ncert = "certs/fullchain.pem"\nkey = "/abs/privkey.pem"\n'
        '[fleets]\nca_file = "ca.pem"\n[listen]\nadmin_socket = "admin.sock"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(path)
    assert config.tls.cert == conf_dir / "certs/fullchain.pem"
    assert config.tls.key == Path("/abs/privkey.pem")
    assert config.fleets.file == conf_dir / "fleets.txt"
    assert config.fleets.ca_file == conf_dir / "ca.pem"
    assert config.listen.admin_socket == str(conf_dir / "admin.sock")

    built = config_from_dict({"fleets": {"file": "f.txt"}}, base_dir=conf_dir)
    assert built.fleets.file == conf_dir / "f.txt"
    assert config_from_dict({}).fleets.file == elsewhere / "fleets.txt"


def test_certbot_symlinks_are_not_followed(tmp_path: Path) -> None:
    # Following live/ -> archive/ now would pin the old certificate after renewal.
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / "cert1.pem").write_text("")
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "cert.pem").symlink_to(tmp_path / "archive" / "cert1.pem")
    config = config_from_dict({"tls": {"cert": "live/cert.pem"}}, base_dir=tmp_path)
    assert config.tls.cert == tmp_path / "live" / "cert.pem"


def test_admin_socket_path_must_fit_a_unix_socket() -> None:
    (line,) = problems({"listen": {"admin_socket": "/run/" + "x" * 120}})
    assert "listen.admin_socket" in line and "107 bytes" in line


@pytest.mark.parametrize("put", ["the file", "a directory", "a link to the file"])
def test_an_admin_socket_path_holding_something_else_is_refused(tmp_path: Path, put: str) -> None:
    """Before, `check` passed it and `run` deleted what was there (the
    configuration file itself, in the CLI audit of session 19)."""
    target = tmp_path / "ingress.toml"
    target.write_text("[listen]\n")
    kind = "a directory" if put == "a directory" else "a regular file"
    if put == "the file":
        where = target
    elif put == "a directory":
        where = tmp_path / "run"
        where.mkdir()
    else:
        where = tmp_path / "link.sock"
        where.symlink_to(target)
    (line,) = problems({"listen": {"admin_socket": str(where)}})
    assert f"listen.admin_socket {where} is {kind}, not a socket" in line
    assert target.read_text() == "[listen]\n"


def test_an_admin_socket_path_that_links_to_a_socket_is_taken(tmp_path: Path) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(tmp_path / "admin.sock"))
        (tmp_path / "link.sock").symlink_to(tmp_path / "admin.sock")
        config = config_from_dict({"listen": {"admin_socket": str(tmp_path / "link.sock")}})
    assert config.listen.admin_socket == str(tmp_path / "link.sock")


def test_direct_construction_resolves_paths_too(tmp_path: Path) -> None:
    assert IngressConfig(fleets={"file": "f.txt"}).fleets.file == tmp_path / "f.txt"


def test_silence_overrides_per_route_name_a_call_prefix() -> None:
    config = config_from_dict(
        {"routes": {"carrier_silence": {"/exotel/": 120}, "fleet_silence": {"/ws/": 0}}}
    )
    assert config.routes.carrier_silence == {"/exotel/": 120.0}
    assert config.routes.fleet_silence == {"/ws/": 0.0}
    [problem] = problems({"routes": {"carrier_silence": {"/voice/": 60}}})
    assert "routes: carrier_silence: '/voice/' is not a call prefix" in problem
    assert "'/ws/', '/exotel/'" in problem
    [problem] = problems({"routes": {"fleet_silence": {"/ws/": -1}}})
    assert "routes.fleet_silence./ws/" in problem


def test_liveness_keys_refuse_what_the_kernel_cannot_take() -> None:
    assert any(
        "timeouts.carrier_silence" in p for p in problems({"timeouts": {"carrier_silence": -1}})
    )
    assert any(
        "timeouts.keepalive_interval" in p
        for p in problems({"timeouts": {"keepalive_interval": 0}})
    )
    assert any(
        "timeouts.keepalive_idle" in p for p in problems({"timeouts": {"keepalive_idle": 40000}})
    )
    assert any(
        "limits.keepalive_probes" in p for p in problems({"limits": {"keepalive_probes": 0}})
    )
    off = config_from_dict(
        {"timeouts": {"carrier_silence": 0, "tcp_user_timeout": 0, "keepalive_idle": 0}}
    )
    assert (off.timeouts.carrier_silence, off.timeouts.tcp_user_timeout) == (0, 0)


def test_process_workers_auto_is_the_cpus_this_process_may_run_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    config = load_config(write(tmp_path, '[process]\nworkers = "auto"\n'))
    assert config.process.worker_count() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("FLEET_INGRESS_PROCESS__WORKERS", "3")
    assert load_config(write(tmp_path, "")).process.worker_count() == 3
    monkeypatch.setenv("FLEET_INGRESS_PROCESS__WORKERS", "0")
    (line,) = problems({})
    assert "process.workers" in line and "FLEET_INGRESS_PROCESS__WORKERS" in line, line


def test_process_cpu_affinity_is_off_or_auto(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).process.cpu_affinity == "off"
    config = load_config(write(tmp_path, '[process]\ncpu_affinity = "auto"\n'))
    assert config.process.cpu_affinity == "auto"
    (line,) = problems({"process": {"cpu_affinity": "0-3"}})
    assert "process.cpu_affinity" in line and "auto" in line, line


def test_a_worker_hang_timeout_is_0_or_at_least_5_seconds(tmp_path: Path) -> None:
    for ok in (0, 5, 600):
        path = tmp_path / f"ok-{ok}.toml"
        path.write_text(f"[process]\nworker_hang_timeout = {ok}\n")
        assert load_config(path).process.worker_hang_timeout == ok
    said = " ".join(problems({"process": {"worker_hang_timeout": 0.5}}))
    assert "process.worker_hang_timeout" in said and "at least 5 seconds" in said


def test_an_ipv4_address_written_as_ipv6_is_no_listener() -> None:
    """Linux refuses to bind one (EINVAL): `run` failed at start while `check` said OK
    (the IPv6 audit of session 14)."""
    assert problems({"listen": {"wss": "[::ffff:127.0.0.1]:8443"}}) == [
        "configuration: listen.wss: ::ffff:127.0.0.1 is an IPv4 address written as IPv6, "
        "which no socket can listen on; write 127.0.0.1:8443"
    ]


def test_a_configuration_handed_to_a_worker_is_the_same_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor hands a worker it starts the configuration it runs
    (config_to_json), not the file, which may have changed since: every kind
    of key comes back the same, relative paths and the environment's overrides
    included, and one invalid on the way is a ConfigError."""
    from fleet_ingress.config.settings import config_from_json, config_to_json

    (tmp_path / "fleets.txt").write_text("https://a.test\n")
    monkeypatch.setenv("FLEET_INGRESS_FLEETS__MAXCONN", "32")
    path = write(
        tmp_path,
        """
[listen]
admin_socket = "run/admin.sock"
[tls]
cert = "cert.pem"
key = "key.pem"
profile = "intermediate"
[routes]
proxy = ["/ws/"]
carrier_silence = {"/ws/" = 12.5}
[retry]
retry_on = ["conn-failure", 503]
[timeouts]
tcp_user_timeout = 0
[process]
workers = 3
""",
    )
    config = load_config(path)
    other_dir = tmp_path / "elsewhere"  # where a relative path would now land
    other_dir.mkdir()
    handed = config_from_json(config_to_json(config), base_dir=other_dir)
    assert handed == config
    assert handed.tls.cert == tmp_path / "cert.pem" and handed.fleets.maxconn == 32
    assert handed.retry.retry_on == ["conn-failure", 503]
    # Only what is not at its default, as a file says it: a worker of another
    # release (started while the venv holds it) would refuse a key it does not
    # know that the file never set (the review of session 16).
    import json

    sent = json.loads(config_to_json(config))
    assert sent["timeouts"] == {"tcp_user_timeout": 0.0} and "log" not in sent
    assert sent["process"] == {"workers": 3} and sent["fleets"]["maxconn"] == 32
    with pytest.raises(ConfigError) as refused:
        config_from_json('{"timeouts": {"queue": -1}}', base_dir=tmp_path)
    assert refused.value.problems[0].startswith("the configuration handed over by the supervisor")
    with pytest.raises(ConfigError):
        config_from_json("[]", base_dir=tmp_path)


def test_an_environment_list_not_written_as_json_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: 'error parsing value for field "routes" from source
    "EnvSettingsSource"', put down to the file (the CLI audit of session 19)."""
    monkeypatch.setenv("FLEET_INGRESS_ROUTES__PROXY", "/ws/")
    (line,) = problems({})
    assert line.startswith("environment variable FLEET_INGRESS_ROUTES__PROXY='/ws/': ")
    assert "routes.proxy" in line and "written there as JSON" in line


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        (
            "FLEET_INGRESS_RETRY__RETRY_ON",
            "429",
            "configuration: retry.retry_on: Input should be a valid list (got 429) (from "
            "environment variable FLEET_INGRESS_RETRY__RETRY_ON); a list is written there as "
            'JSON, e.g. \'["conn-failure", "empty-response", "response-timeout"]\'',
        ),
        (
            "FLEET_INGRESS_ROUTES__PROXY",
            '"/ws/"',
            "configuration: routes.proxy: Input should be a valid list (got '/ws/') (from "
            "environment variable FLEET_INGRESS_ROUTES__PROXY); a list is written there as "
            'JSON, e.g. \'["/ws/", "/exotel/"]\'',
        ),
        (
            "FLEET_INGRESS_ROUTES__CARRIER_SILENCE",
            "60",
            "configuration: routes.carrier_silence: Input should be a valid dictionary (got "
            "60) (from environment variable FLEET_INGRESS_ROUTES__CARRIER_SILENCE); a table "
            "is written there as JSON, e.g. '{\"/exotel/\": 60}'",
        ),
    ],
)
def test_an_environment_value_that_is_json_but_no_list_says_how_to_write_one(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, said: str
) -> None:
    """FLEET_INGRESS_RETRY__RETRY_ON=429 (meant: retry on 429 too) is JSON, so
    read, and refused as "Input should be a valid list (got 429)", with nothing
    of how a list is written in a variable (the operator-input audit of session 38)."""
    monkeypatch.setenv(name, value)
    assert problems({}) == [said]


def test_a_section_s_key_written_below_another_header_says_where_it_went() -> None:
    (line,) = problems({"log": {"fleets": {"maxconn": 3}}})
    assert "unknown key 'log.fleets'; a key written below [log] is in it" in line
    assert "under a [fleets] header" in line


def test_a_byte_order_mark_first_is_dropped_as_the_fleets_file_drops_it(tmp_path: Path) -> None:
    """Windows Notepad's UTF-8 starts with one: before, "TOML syntax error:
    Invalid statement (at line 1, column 1)", before any character the editor
    shows, and the service did not start (the CLI audit of session 32). The
    wrong-type check reads the file too: it still names a quoted number."""
    from fleet_ingress.cli import _admin_socket_leniently
    from fleet_ingress.ops.live_check import live_settings

    path = tmp_path / "ingress.toml"
    path.write_text('[fleets]\nmaxconn = 32\n[listen]\nadmin_socket = "a.sock"\n', "utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert load_config(path).fleets.maxconn == 32
    assert _admin_socket_leniently(path) == str(tmp_path / "a.sock")
    assert live_settings(path, environ={}).admin_socket == str(tmp_path / "a.sock")
    path.write_text('[fleets]\nmaxconn = "32"\n', "utf-8-sig")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path} line 2: fleets.maxconn: '32' is a string; write a whole number, unquoted"
    ]


def test_a_tcp_user_timeout_the_kernel_cannot_take_is_refused(tmp_path: Path) -> None:
    """TCP_USER_TIMEOUT is a C int of milliseconds: above 2147483 seconds
    setsockopt raised TypeError (not OSError) at every accept and every fleet
    connection, so every call failed, while check passed (the config audit of
    session 35). Refused here, naming the bound; the bound itself is taken
    and set on a real socket."""
    import socket

    from fleet_ingress.net.liveness import TcpLiveness

    path = write(tmp_path, "[timeouts]\ntcp_user_timeout = 2147484\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path} line 2: timeouts.tcp_user_timeout: must be at most 2147483 seconds (got "
        "2147484); "
        "0 leaves the kernel's default"
    ]
    edge = load_config(write(tmp_path, "[timeouts]\ntcp_user_timeout = 2147483\n"))
    with socket.socket() as sock:
        TcpLiveness(user_timeout=edge.timeouts.tcp_user_timeout).apply(sock)
        got = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
    # The kernel's is liveness.BACKSTOP past the ingress's own give-up, as far
    # as a C int of ms goes (past it, a TypeError at every call, as above).
    assert got == 2**31 - 1


def test_a_section_written_twice_in_two_cases_is_refused_not_half_lost(tmp_path: Path) -> None:
    """Section names are read without regard to case ([Fleets] is [fleets]),
    so a file with both kept one table and dropped the other's keys without a
    word: here maxconn = 8 was 16 (the config audit of session 35). A quoted
    number under [Fleets] was taken too, where under [fleets] it is refused."""
    path = write(tmp_path, "[Fleets]\nfall = 3\n[fleets]\nmaxconn = 8\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path}: [Fleets] and [fleets] are one section (its name is read without regard "
        "to case), and the keys of one would be lost; put them all under [fleets]"
    ]
    assert load_config(write(tmp_path, "[Fleets]\nmaxconn = 8\n")).fleets.maxconn == 8
    path = write(tmp_path, '[Fleets]\nmaxconn = "8"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path} line 2: fleets.maxconn: '8' is a string; write a whole number, unquoted"
    ]


def test_a_link_to_nothing_or_a_special_file_is_not_called_missing(tmp_path: Path) -> None:
    """`check -c` of a symlink whose target is gone (a release directory
    removed), or of a FIFO (`-c <(envsubst < ingress.toml.in)`), said "no such
    file" of a path `ls` shows (the config audit of session 35)."""
    link = tmp_path / "ingress.toml"
    link.symlink_to(tmp_path / "releases" / "ingress.toml")
    with pytest.raises(ConfigError) as caught:
        load_config(link)
    assert caught.value.problems == [
        f"{link}: cannot read the configuration file: it is a symbolic link to "
        f"{tmp_path / 'releases' / 'ingress.toml'}, which is not there; point the link at "
        "the TOML file, or give that file with -c"
    ]
    fifo = tmp_path / "pipe.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError) as caught:
        load_config(fifo)
    assert caught.value.problems == [
        f"{fifo}: cannot read the configuration file: it is a pipe, not a regular file "
        "(it is read more than once); write the configuration to a file and give that"
    ]


def test_a_byte_not_utf8_is_named_by_its_line_as_the_fleets_file_names_it(
    tmp_path: Path,
) -> None:
    """A Latin-1 "é" in a comment: the fleets file says which line and byte;
    the configuration file said only "it is not UTF-8 text" (the config audit
    of session 35)."""
    path = tmp_path / "ingress.toml"
    path.write_bytes(b"[fleets]\nmaxconn = 8\n# caf\xe9 du coin\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path}: cannot read the configuration file: line 3 is not UTF-8 text (byte 0xe9); "
        "save the file as UTF-8 text"
    ]


@pytest.mark.parametrize(
    ("toml", "line"),
    [
        (
            "[process]\nworker_hang_timeout = inf\n",
            "process.worker_hang_timeout: Input should be a finite number (got inf); "
            "0 never kills a hung worker",
        ),
        (
            "[timeouts]\nupgrade_drain = inf\n",
            "timeouts.upgrade_drain: Input should be a finite number (got inf); 0 keeps the "
            "old generation's calls until they end",
        ),
    ],
)
def test_infinity_for_never_is_refused_naming_the_0_that_means_it(
    tmp_path: Path, toml: str, line: str
) -> None:
    """`worker_hang_timeout = inf` was taken: the supervisor's picture then
    carried Infinity, which JSON does not have (/stats.json: a browser's
    JSON.parse refuses it), and `stat` said "killed and replaced once silent
    infs" (the config audit of session 35). 0 is how these keys say never."""
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path} line 2: {line}"]


def test_a_variable_one_level_too_deep_is_named_as_the_environments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FLEET_INGRESS_TIMEOUTS__CONNECT__MS=3000 makes timeouts.connect a table:
    the problem was said without the variable, as if in the file, where no
    such line is (the config audit of session 35)."""
    monkeypatch.setenv("FLEET_INGRESS_TIMEOUTS__CONNECT__MS", "3000")
    (line,) = problems({})
    assert line.startswith("configuration: timeouts.connect: ")
    assert line.endswith(" (from environment variable FLEET_INGRESS_TIMEOUTS__CONNECT__MS)")


def test_a_section_or_variable_in_capitals_is_read_alike_by_the_lenient_readers(
    tmp_path: Path,
) -> None:
    """`run` reads [Listen] as [listen], and fleet_ingress_listen__stats as
    FLEET_INGRESS_LISTEN__STATS (pydantic-settings ignores the case); the
    admin commands' socket finder and `check --live` (keepalived's track
    script) read exact names, so they asked the default socket and stats
    port, and the track script judged a healthy ingress dead (the config
    audit of session 35)."""
    from fleet_ingress.cli import _admin_socket_leniently
    from fleet_ingress.ops.live_check import live_settings

    path = write(
        tmp_path,
        '[Listen]\nadmin_socket = "a.sock"\nstats = "127.0.0.1:9404"\n[ROUTES]\nhealth = "/up"\n',
    )
    config = load_config(path)
    assert (config.listen.admin_socket, config.listen.stats) == (
        str(tmp_path / "a.sock"),
        "127.0.0.1:9404",
    )
    assert _admin_socket_leniently(path) == config.listen.admin_socket
    live = live_settings(path, environ={"fleet_ingress_listen__wss": "127.0.0.1:8443"})
    assert (live.admin_socket, live.stats, live.health, live.wss) == (
        config.listen.admin_socket,
        "127.0.0.1:9404",
        "/up",
        "127.0.0.1:8443",
    )


def test_a_duration_with_a_unit_from_the_environment_is_said_as_the_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In the file, connect = "30s" is told to be a number of seconds; from
    the environment it was pydantic's "unable to parse string as a number"
    (the config audit of session 35)."""
    monkeypatch.setenv("FLEET_INGRESS_TIMEOUTS__CONNECT", "30s")
    assert problems({}) == [
        "configuration: timeouts.connect: '30s' is not a number; write a number of seconds, "
        "e.g. 10 (from environment variable FLEET_INGRESS_TIMEOUTS__CONNECT)"
    ]


def test_one_variable_set_in_two_cases_is_refused_naming_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pydantic-settings reads variable names without regard to case, so
    FLEET_INGRESS_FLEETS__MAXCONN=8 and fleet_ingress_fleets__maxconn=32 both
    set was one of them, whichever the environment listed last, without a word
    (the config audit of session 35). The same value twice decides nothing."""
    monkeypatch.setenv("FLEET_INGRESS_FLEETS__MAXCONN", "8")
    monkeypatch.setenv("fleet_ingress_fleets__maxconn", "32")
    assert problems({}) == [
        "environment: FLEET_INGRESS_FLEETS__MAXCONN='8' and fleet_ingress_fleets__maxconn='32' "
        "are one variable (its name is read without regard to case), and which one is taken "
        "is left to chance; unset all but one"
    ]
    monkeypatch.setenv("fleet_ingress_fleets__maxconn", "8")
    assert config_from_dict({}).fleets.maxconn == 8


def test_workers_past_any_host_are_refused_naming_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """process.workers = 100000 was taken: the supervisor would fork that many
    Python processes (the bounds audit of session 35). From the environment too."""
    path = write(tmp_path, "[process]\nworkers = 100000\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f'{path} line 2: process.workers: must be at most 1024 (got 100000); write "auto" for '
        "one per CPU this process may run on"
    ]
    monkeypatch.setenv("FLEET_INGRESS_PROCESS__WORKERS", "5000")
    (line,) = problems({})
    assert line.startswith("configuration: process.workers: must be at most 1024 (got 5000)")


def test_a_problem_in_the_file_names_the_line_of_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fleets file's problems name their line; the configuration file's
    named the key alone, to be searched for in a file of 180 lines, under a
    header or as a dotted key (the config audit of session 35). From the
    environment, the variable is named instead: no line of the file holds it."""
    path = write(
        tmp_path,
        'fleets.maxconn = 0\n[limits]\nnotes = """\nmax_queue = 0\n"""\nmax_queue = -1\n'
        '[ timeouts ]\n"connect" = -1\n[fleet]\n[Log]\naccess = "no"\n',
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert sorted(caught.value.problems) == sorted(
        [
            f"{path} line 11: log.access: 'no' is a string; write true or false",
            f"{path} line 1: fleets.maxconn: must be at least 1 (got 0)",
            f"{path} line 3: limits.notes: unknown key 'limits.notes'",
            f"{path} line 6: limits.max_queue: must be at least 0 (got -1)",
            f"{path} line 8: timeouts.connect: must be more than 0 seconds (got -1)",
            f"{path} line 9: fleet: unknown key 'fleet'; did you mean 'fleets'?",
        ]
    )
    monkeypatch.setenv("FLEET_INGRESS_LIMITS__MAX_QUEUE", "-2")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert (
        f"{path}: limits.max_queue: must be at least 0 (got '-2') (from environment variable "
        "FLEET_INGRESS_LIMITS__MAX_QUEUE)"
    ) in caught.value.problems


def test_a_supervisor_of_a_release_that_took_an_infinite_hang_timeout_hands_it_over(
    tmp_path: Path,
) -> None:
    """Releases before session 35 took `process.worker_hang_timeout = inf`
    (never) and hand it to each worker they start as JSON's Infinity (their
    config_to_json, byte for byte). A worker of this release started by such a
    supervisor (a replacement while the venv holds this release, before the
    `upgrade`) refused it and exited, again at each respawn: the host served
    with a worker fewer. Handed over, it reads as its 0 (never: the same);
    written in the file it is still refused."""
    from fleet_ingress.config.settings import config_from_json

    old_release_wrote = (
        f'{{"fleets": {{"file": "{tmp_path / "fleets.txt"}"}}, '
        '"process": {"worker_hang_timeout": Infinity}}'
    )
    handed = config_from_json(old_release_wrote, base_dir=tmp_path)
    assert handed.process.worker_hang_timeout == 0
    assert handed.fleets.file == tmp_path / "fleets.txt"
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, "[process]\nworker_hang_timeout = inf\n"))


def test_a_close_flush_past_the_tunnel_timeout_is_refused_naming_both_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """timeouts.close_flush had no upper bound, unlike anything that holds a
    call: 10000 (meant as milliseconds) held a closing side whose peer reads
    nothing, and its buffers, for 2.8 hours, past timeouts.tunnel (1 h), after
    which a call with no bytes either way is closed. At most tunnel now; the
    error names both keys and the fix, in the file and from the environment;
    handed over by an earlier release's supervisor, it reads as the tunnel's."""
    from fleet_ingress.config.settings import config_from_json

    path = write(tmp_path, "[timeouts]\nclose_flush = 10000\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (said,) = caught.value.problems
    assert said.startswith(
        f"{path} line 2: timeouts.close_flush: must be at most timeouts.tunnel, 3600 seconds "
        "(got 10000)"
    ), said
    assert "write seconds, not milliseconds, or raise timeouts.tunnel" in said
    # The bound is the tunnel's as set, and the edge is taken.
    edge = load_config(write(tmp_path, "[timeouts]\ntunnel = 60\nclose_flush = 60\n"))
    assert edge.timeouts.close_flush == 60
    assert load_config(write(tmp_path, "[timeouts]\ntunnel = 7200\nclose_flush = 5000\n"))
    monkeypatch.setenv("FLEET_INGRESS_TIMEOUTS__CLOSE_FLUSH", "61")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "[timeouts]\ntunnel = 60\n"))
    (said,) = caught.value.problems
    assert "timeouts.tunnel, 60 seconds (got 61)" in said, said
    assert "FLEET_INGRESS_TIMEOUTS__CLOSE_FLUSH" in said
    monkeypatch.delenv("FLEET_INGRESS_TIMEOUTS__CLOSE_FLUSH")
    handed = config_from_json('{"timeouts": {"close_flush": 10000}}', base_dir=tmp_path)
    assert handed.timeouts.close_flush == 3600
    handed = config_from_json('{"timeouts": {"close_flush": 100, "tunnel": 50}}', base_dir=tmp_path)
    assert handed.timeouts.close_flush == 50


def test_an_unset_close_flush_follows_a_tunnel_timeout_shorter_than_its_default(
    tmp_path: Path,
) -> None:
    """timeouts.close_flush is at most timeouts.tunnel, but the shipped template
    wrote `close_flush = 10.0`, so an operator's tunnel under 10 s was refused
    for a value they never chose; with close_flush unset, the default 10 stood
    past such a tunnel unjudged. Unset, it is now 10 s or the tunnel when
    shorter (and handed over still unset); set, it is judged as before, the
    error naming the way out that removing it is."""
    from importlib import resources

    from fleet_ingress.config.settings import config_from_json, config_to_json

    template = (resources.files("fleet_ingress.config") / "templates" / "ingress.toml").read_text()
    assert "\ntunnel = 3600.0\n" in template
    lowered = template.replace("\ntunnel = 3600.0\n", "\ntunnel = 5\n")
    shipped = load_config(write(tmp_path, lowered))
    assert (shipped.timeouts.tunnel, shipped.timeouts.close_flush) == (5, 5)
    assert load_config(write(tmp_path, "[timeouts]\ntunnel = 4\n")).timeouts.close_flush == 4
    assert load_config(write(tmp_path, "[timeouts]\ntunnel = 60\n")).timeouts.close_flush == 10
    kept = load_config(write(tmp_path, "[timeouts]\ntunnel = 5\nclose_flush = 2\n"))
    assert kept.timeouts.close_flush == 2
    unset = config_from_dict({"timeouts": {"tunnel": 5}})
    assert "close_flush" not in json.loads(config_to_json(unset))["timeouts"]
    handed = config_from_json(config_to_json(unset), base_dir=tmp_path)
    assert handed.timeouts.close_flush == 5
    (said,) = problems({"timeouts": {"tunnel": 5, "close_flush": 10}})
    assert "timeouts.close_flush: must be at most timeouts.tunnel, 5 seconds (got 10)" in said
    assert "remove timeouts.close_flush (unset, it is 10 seconds, or timeouts.tunnel" in said


def test_a_supervisor_of_a_release_without_the_upper_bounds_hands_its_values_over(
    tmp_path: Path,
) -> None:
    """Releases before the bounds audit of session 35 took any number for
    limits.max_connections, limits.max_header_bytes, fleets.maxconn and
    process.workers, and hand it to each worker they start. A worker of this
    release started by such a supervisor (a replacement while the venv holds
    this release, before the `upgrade`; or a reload it is handed) refused it
    and exited, again at each respawn, as for the Infinity above. Handed over,
    each reads as its bound (past what a worker or a host carries); written
    in the file, each is still refused."""
    from fleet_ingress.config.settings import config_from_json

    old_release_wrote = (
        '{"limits": {"max_connections": 2000000, "max_header_bytes": 4194304}, '
        '"fleets": {"maxconn": 99999999}, "process": {"workers": 2048}}'
    )
    handed = config_from_json(old_release_wrote, base_dir=tmp_path)
    assert handed.limits.max_connections == 1_048_576
    assert handed.limits.max_header_bytes == 1_048_576
    assert handed.fleets.maxconn == 1_000_000
    assert handed.process.workers == 1024
    # Within the bounds, handed as they are.
    within = config_from_json('{"fleets": {"maxconn": 64}}', base_dir=tmp_path)
    assert within.fleets.maxconn == 64
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, "[limits]\nmax_connections = 2000000\n"))


def test_a_handed_configuration_is_not_judged_again_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handed configuration already holds what the environment set (the
    supervisor read it with the same environment, which its workers inherit).
    Applied again, a value an older release took from a variable
    (FLEET_INGRESS_PROCESS__WORKER_HANG_TIMEOUT=inf, a maxconn past the bound),
    or one variable in two cases, was refused by a worker of this release
    started by such a supervisor, at every respawn, whatever the JSON said."""
    from fleet_ingress.config.settings import config_from_json

    monkeypatch.setenv("FLEET_INGRESS_PROCESS__WORKER_HANG_TIMEOUT", "inf")
    monkeypatch.setenv("FLEET_INGRESS_FLEETS__MAXCONN", "5000000")
    monkeypatch.setenv("FLEET_INGRESS_LOG__LEVEL", "debug")
    monkeypatch.setenv("fleet_ingress_log__level", "warning")
    old_release_wrote = (
        '{"fleets": {"maxconn": 5000000}, "log": {"level": "debug"}, '
        '"process": {"worker_hang_timeout": Infinity}}'
    )
    handed = config_from_json(old_release_wrote, base_dir=tmp_path)
    assert handed.process.worker_hang_timeout == 0
    assert handed.fleets.maxconn == 1_000_000
    assert handed.log.level == "debug"  # as the supervisor ran it
    with pytest.raises(ConfigError):  # read from the environment, refused as before
        load_config(None)


def test_a_table_from_the_environment_names_only_the_file_values_it_hides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table from the environment (JSON) is merged key by key with the
    file's, as `run` reads them: the file's keys it does not set stay in
    force. check and the ready line said the whole of the file's table was
    hidden ("not the file's {'/ws/': 30.0}: the environment wins", in
    Python's spelling) while the file's /ws/ = 30 served on (the review of
    session 35). Only what the variable does set over the file is named."""
    from fleet_ingress.config.settings import environment_values

    path = write(
        tmp_path,
        '[routes]\nhealth = "/up"\ncarrier_silence = {"/ws/" = 30}\n',
    )
    monkeypatch.setenv("FLEET_INGRESS_ROUTES__CARRIER_SILENCE", '{"/exotel/": 60}')
    monkeypatch.setenv("FLEET_INGRESS_ROUTES", '{"health": "/ok", "carrier_silence": {"/ws/": 5}}')
    config = load_config(path)
    assert config.routes.carrier_silence == {"/ws/": 5, "/exotel/": 60}
    assert config.routes.health == "/ok"
    routes, silence = environment_values(path)
    assert routes.startswith(
        """routes = '{"health": "/ok", "carrier_silence": {"/ws/": 5}}' from environment """
        """variable FLEET_INGRESS_ROUTES, not the file's {health = '/up', carrier_silence = """
        """{'/ws/' = 30}}: the environment wins; """
    ), routes
    assert silence == (
        """routes.carrier_silence = '{"/exotel/": 60}' from environment variable """
        "FLEET_INGRESS_ROUTES__CARRIER_SILENCE, not the file"
    )


@pytest.mark.parametrize(
    ("section", "key", "written", "read"),
    [
        ("limits", "max_connections", 2_000_000, 1_048_576),
        ("limits", "max_header_bytes", 2_000_000, 1_048_576),
        ("process", "workers", 5000, 1024),
        ("fleets", "maxconn", 10**7, 1_000_000),
        ("timeouts", "tcp_user_timeout", 3_000_000.0, 2_147_483),
    ],
)
def test_a_supervisor_of_a_release_before_the_upper_bounds_hands_its_limits_over(
    tmp_path: Path, section: str, key: str, written: float, read: float
) -> None:
    """Releases before session 35 took limits above this one's bounds (a
    maxconn of ten million meant "no limit") and hand them to each worker they
    start. A worker of this release started by such a supervisor (a
    replacement while the venv holds this release, before the `upgrade`)
    refused them and exited at every respawn: the host served with a worker
    fewer. Handed over, each reads as its bound; written in the file, refused.
    (End to end: test_cross_version, with the release before's own code.)"""
    from fleet_ingress.config.settings import config_from_json

    old_release_wrote = json.dumps(
        {"fleets": {"file": str(tmp_path / "fleets.txt")}, section: {key: written}}
    )
    handed = config_from_json(old_release_wrote, base_dir=tmp_path)
    assert getattr(getattr(handed, section), key) == read
    assert handed.fleets.file == tmp_path / "fleets.txt"
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, f"[{section}]\n{key} = {written}\n"))


def test_a_variable_in_two_cases_a_release_before_took_does_not_refuse_what_it_hands_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Releases before session 35 took one variable set in two cases (one of
    them, as the environment listed them), and hand their configuration to
    each worker they start, with that environment. A worker of this release
    started by such a supervisor (a replacement while the venv holds this
    release) refused it and exited at every respawn; so did the reading of
    the snapshot a supervisor started after a crash serves. Handed over, the
    environment's value is taken as the supervisor took it; read from the
    file, refused."""
    from fleet_ingress.config.settings import config_from_json

    monkeypatch.setenv("FLEET_INGRESS_LIMITS__MAX_QUEUE", "5")
    monkeypatch.setenv("fleet_ingress_limits__max_queue", "6")
    # What the supervisor took (one of the two) is in what it hands over.
    took = {"fleets": {"file": str(tmp_path / "fleets.txt")}, "limits": {"max_queue": 6}}
    handed = config_from_json(json.dumps(took), base_dir=tmp_path)
    assert handed.limits.max_queue == 6
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, "[limits]\nmax_queue = 3\n"))


def test_a_file_edit_is_said_hidden_only_where_the_environment_sets_the_key_edited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a reload says of an edit the environment hides (`edits_hidden`):
    a key the variable sets, edited or newly written, is named with the
    variable; a key of a JSON table's section it does not set is the file's
    (applied), and a key the edit removed or left alone is not said."""
    from fleet_ingress.config.settings import edits_hidden, file_settings

    monkeypatch.setenv("FLEET_INGRESS_FLEETS__MAXCONN", "16")
    monkeypatch.setenv("FLEET_INGRESS_TIMEOUTS", '{"connect": 2}')
    before = file_settings(write(tmp_path, "[fleets]\nmaxconn = 8\n[timeouts]\nqueue = 3\n"))
    after = file_settings(
        write(tmp_path, "[Fleets]\nmaxconn = 32\n[timeouts]\nqueue = 4\nconnect = 9\n")
    )
    maxconn, connect = edits_hidden(before, after)
    assert maxconn.startswith(
        "fleets.maxconn: the file's edit (8 -> 32) is not applied: environment variable "
        "FLEET_INGRESS_FLEETS__MAXCONN='16' sets it, and the environment wins; unset it "
    ), maxconn
    assert maxconn.endswith("(a reload or an upgrade keeps the environment it started with)")
    assert connect.startswith(
        "timeouts: the file's edit (not set -> {connect = 9}) is not applied: environment "
        """variable FLEET_INGRESS_TIMEOUTS='{"connect": 2}' sets it"""
    ), connect
    assert edits_hidden(after, after) == []
    assert edits_hidden(after, before | {"fleets": {}}) == []  # removed: the file's own say


def test_kubernetes_variables_of_another_fleet_ingress_service_are_not_said_by_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Service named fleet-ingress-metrics beside fleet-ingress (a scrape
    Service) gets FLEET_INGRESS_METRICS_SERVICE_HOST and its kin in every pod
    of the namespace: `run` said them at its start and in every reload's
    answer as typos to fix and restart for, while Kubernetes' own
    FLEET_INGRESS_SERVICE_HOST was quiet. Kubernetes' too, by the Service's
    name; a typo naming no key is said still."""
    from fleet_ingress.config.settings import unread_variables, unread_variables_said_by_run

    for name in [n for n in os.environ if n.upper().startswith("FLEET_INGRESS_")]:
        monkeypatch.delenv(name)
    kubernetes = {
        "FLEET_INGRESS_METRICS_SERVICE_HOST": "10.96.0.14",
        "FLEET_INGRESS_METRICS_SERVICE_PORT": "8404",
        "FLEET_INGRESS_METRICS_SERVICE_PORT_HTTP": "8404",
        "FLEET_INGRESS_METRICS_PORT": "tcp://10.96.0.14:8404",
        "FLEET_INGRESS_METRICS_PORT_8404_TCP_ADDR": "10.96.0.14",
        "FLEET_INGRESS_BLUE_2_SERVICE_HOST": "10.96.0.15",  # fleet-ingress-blue-2
    }
    for name, value in kubernetes.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FLEET_INGRESS_FLEET_MAXCONN", "4")  # names no key
    (typo,) = unread_variables_said_by_run()
    assert typo.startswith("environment: FLEET_INGRESS_FLEET_MAXCONN is not read: "), typo
    said = [line for line in unread_variables() if line != typo.split("; fix it")[0]]
    assert said == [
        f"environment: {name} is not read (Kubernetes sets it for a Service named "
        + ("fleet-ingress-blue-2)" if "BLUE" in name else "fleet-ingress-metrics)")
        for name in sorted(kubernetes)
    ], said
