"""What a reload says it applied of the settings (config.config_diff): no I/O."""

from __future__ import annotations

from fleet_ingress.config.config_diff import SHOWN_CHARACTERS, settings_changed
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


def test_a_long_value_is_cut():
    after = config(routes={"proxy": ["/ws/", "/exotel/", *(f"/r{i}/" for i in range(30))]})
    said = settings_changed(config(), after)
    assert said is not None and said.startswith("routes.proxy ")
    assert all(len(side) <= SHOWN_CHARACTERS + 20 for side in said.split(" -> "))
