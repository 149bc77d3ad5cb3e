"""Accept pacing: when a busy worker with live calls takes its next connection (no I/O)."""

from fleet_ingress.core.accept_pacing import FIRST_PAUSE, MAX_PAUSE, WINDOW, AcceptPacer

STEP = 1.5 * WINDOW  # accepts this far apart: each closes a measuring window


def _windows(pacer: AcceptPacer, busy: list[float], calls: int = 5) -> list[float]:
    """Feed one accept per window at the given busy shares; the pause after each.
    The clocks go on from where the pacer's last window started."""
    if pacer._since is None:
        pacer.after_accept(100.0, 100.0, calls)  # the first accept opens the first window
    now, cpu = pacer._since, pacer._cpu_since
    pauses = []
    for share in busy:
        now += STEP
        cpu += share * STEP
        pauses.append(pacer.after_accept(now, cpu, calls))
    return pauses


def test_a_busy_worker_with_calls_doubles_its_pause_up_to_the_cap():
    pauses = _windows(AcceptPacer(busy_share=0.5), [0.9] * 7)
    assert pauses == [FIRST_PAUSE * 2**i for i in range(5)] + [MAX_PAUSE, MAX_PAUSE]
    assert MAX_PAUSE == FIRST_PAUSE * 16


def test_the_pause_halves_once_the_worker_is_under_its_share_then_stops():
    pacer = AcceptPacer(busy_share=0.5)
    _windows(pacer, [0.9] * 6)
    assert pacer.pause == MAX_PAUSE
    pauses = _windows(pacer, [0.3] * 6)
    assert pauses == [0.008, 0.004, 0.002, 0.001, 0.0, 0.0]


def test_after_a_quiet_spell_without_accepts_no_pause_is_left():
    pacer = AcceptPacer(busy_share=0.5)
    _windows(pacer, [0.9] * 6)
    assert pacer.pause == MAX_PAUSE
    since, cpu = pacer._since, pacer._cpu_since
    # Ten windows without a connection, the calls alone keeping the worker at 0.2.
    assert pacer.after_accept(since + 10 * WINDOW, cpu + 2 * WINDOW, 5) == 0.0


def test_a_worker_under_its_share_never_pauses():
    assert _windows(AcceptPacer(busy_share=0.5), [0.49, 0.1, 0.5, 0.0]) == [0.0] * 4


def test_no_live_call_no_pause_however_busy():
    # A reconnect storm into an idle ingress: nothing to protect, full speed.
    pacer = AcceptPacer(busy_share=0.5)
    assert _windows(pacer, [1.0] * 5, calls=0) == [0.0] * 5
    assert pacer.pause == 0.0


def test_a_pause_learned_with_calls_is_not_applied_once_the_calls_are_gone():
    pacer = AcceptPacer(busy_share=0.5)
    _windows(pacer, [0.9] * 3)
    assert pacer.pause > 0
    assert _windows(pacer, [0.9], calls=0) == [0.0]


def test_accepts_within_a_window_keep_the_pause_without_remeasuring():
    pacer = AcceptPacer(busy_share=0.5)
    _windows(pacer, [0.9, 0.9])
    pause = pacer.pause
    now, cpu = pacer._since, pacer._cpu_since
    # Ten accepts in a tenth of a window, the CPU pegged meanwhile: the share is
    # judged over whole windows, so the pause neither grows nor shrinks yet.
    for i in range(1, 11):
        assert pacer.after_accept(now + i * WINDOW / 100, cpu + i * WINDOW / 100, 3) == pause


def test_a_share_of_one_core_turns_pacing_off():
    pacer = AcceptPacer(busy_share=1.0)
    assert not pacer.enabled
    pauses = [pacer.after_accept(100.0 + i * STEP, 100.0 + i * STEP, 5) for i in range(5)]
    assert pauses == [0.0] * 5
    assert AcceptPacer(busy_share=0.99).enabled
