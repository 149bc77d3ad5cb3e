"""What a reload says it applied of the settings (config.config_diff): no I/O."""

from __future__ import annotations

from fleet_ingress.config.config_diff import SHOWN_CHARACTERS, fleets_changed, settings_changed
from fleet_ingress.config.settings import IngressConfig


def config(**sections: dict) -> IngressConfig:
    return IngressConfig.model_validate(sections)


def test_each_setting_a_reload_applies_is_said_with_its_old_and_new_value():
    before = config()
    after = config(timeouts={"drain": 60}, log={"level": "debug"})
    said = settings_changed(before, after)
    assert said == "log.level info -> debug, timeouts.drain 300.0 -> 60.0"
    assert settings_changed(before, config()) is None  # nothing changed: nothing said


def test_listeners_and_process_settings_are_left_to_their_own_notes():
    """Their notes say they wait for a restart or an upgrade: not 'applied'."""
    before = config()
    after = config(listen={"wss": "0.0.0.0:8443"}, process={"workers": 3})
    assert settings_changed(before, after) is None


def test_process_accept_is_said_applied_as_a_reload_applies_it_at_once():
    before = config()
    after = config(process={"accept": "first", "workers": 3})
    assert settings_changed(before, after) == "process.accept spread -> first"


def test_a_long_value_is_cut():
    after = config(routes={"proxy": ["/ws/", "/exotel/", *(f"/r{i}/" for i in range(30))]})
    said = settings_changed(config(), after)
    assert said is not None and said.startswith("routes.proxy ")
    assert all(len(side) <= SHOWN_CHARACTERS + 20 for side in said.split(" -> "))


def test_the_fleets_file_against_the_fleets_in_force_names_each_difference_but_admin():
    from fleet_ingress.config.fleets_file import parse_fleets_text

    def fleets(text: str):
        return parse_fleets_text(text, default_maxconn=16)

    running = fleets("https://a.test name=a\nhttps://b.test name=b\n")
    assert fleets_changed(running, running) is None
    # An admin state only the file has (or only what runs has): not an edit to show.
    assert (
        fleets_changed(
            running, fleets("https://a.test name=a admin=drain\nhttps://b.test name=b\n")
        )
        is None
    )
    on_disk = fleets("https://a2.test name=a maxconn=20\nhttps://c.test name=c\n")
    assert fleets_changed(running, on_disk) == (
        "fleet c added, fleet b removed, fleet a url https://a.test -> https://a2.test, "
        "fleet a maxconn 16 -> 20"
    )


def test_a_moved_call_listener_says_what_it_means_for_keepalived_until_a_restart():
    """A reload leaves listen.wss where it was bound; `check --live` (keepalived's
    check) reads the configured address and failed at once with nothing to say
    why (the operator-journeys audit)."""
    from fleet_ingress.service.ingress import listener_notes

    bound = config().listen
    moved = config(listen={"wss": "127.0.0.1:9443", "stats": "127.0.0.1:9404"})
    notes = listener_notes(bound, moved)
    (wss,) = [n for n in notes if n.startswith("listen.wss")]
    assert "takes effect at the next restart" in wss and "check --live" in wss
    (stats,) = [n for n in notes if n.startswith("listen.stats")]
    assert stats == "listen.stats changed: takes effect at the next restart"
