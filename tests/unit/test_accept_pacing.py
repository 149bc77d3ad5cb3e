"""Accept pacing: when a worker with live calls takes its next connection (no I/O).

The CPU fed in is what new connections used (handshakes, heads), not the calls'."""

from fleet_ingress.core.accept_pacing import FIRST_PAUSE, MAX_PAUSE, WINDOW, AcceptPacer

STEP = 1.5 * WINDOW  # accepts this far apart: each closes a measuring window


def _windows(pacer: AcceptPacer, shares: list[float], calls: int = 5) -> list[float]:
    """Feed one accept per window, new connections using the given shares of a
    core; the pause after each. The clocks go on from the pacer's last window."""
    if pacer._since is None:
        pacer.after_accept(100.0, 100.0, calls)  # the first accept opens the first window
    now, spent = pacer._since, pacer._spent_since
    pauses = []
    for share in shares:
        now += STEP
        spent += share * STEP
        pauses.append(pacer.after_accept(now, spent, calls))
    return pauses


def test_new_connections_over_their_share_with_calls_live_double_the_pause_up_to_the_cap():
    pauses = _windows(AcceptPacer(share=0.5), [0.9] * 7)
    assert pauses == [FIRST_PAUSE * 2**i for i in range(5)] + [MAX_PAUSE, MAX_PAUSE]
    assert MAX_PAUSE == FIRST_PAUSE * 16


def test_the_pause_halves_once_new_connections_are_under_their_share_then_stops():
    pacer = AcceptPacer(share=0.5)
    _windows(pacer, [0.9] * 6)
    assert pacer.pause == MAX_PAUSE
    pauses = _windows(pacer, [0.3] * 6)
    assert pauses == [0.008, 0.004, 0.002, 0.001, 0.0, 0.0]


def test_after_a_quiet_spell_without_accepts_no_pause_is_left():
    pacer = AcceptPacer(share=0.5)
    _windows(pacer, [0.9] * 6)
    assert pacer.pause == MAX_PAUSE
    since, spent = pacer._since, pacer._spent_since
    # Ten windows without a new connection (the flood over), one arrives.
    assert pacer.after_accept(since + 10 * WINDOW, spent + 0.01, 5) == 0.0


def test_new_connections_under_their_share_never_pause():
    assert _windows(AcceptPacer(share=0.5), [0.49, 0.1, 0.5, 0.0]) == [0.0] * 4


def test_no_live_call_no_pause_however_costly_the_connections():
    # Nothing to protect: however much new connections cost, full speed.
    pacer = AcceptPacer(share=0.5)
    assert _windows(pacer, [1.0] * 5, calls=0) == [0.0] * 5
    assert pacer.pause == 0.0


def test_a_pause_learned_with_calls_is_not_applied_once_the_calls_are_gone():
    pacer = AcceptPacer(share=0.5)
    _windows(pacer, [0.9] * 3)
    assert pacer.pause > 0
    assert _windows(pacer, [0.9], calls=0) == [0.0]


def test_accepts_within_a_window_keep_the_pause_without_remeasuring():
    pacer = AcceptPacer(share=0.5)
    _windows(pacer, [0.9, 0.9])
    pause = pacer.pause
    now, spent = pacer._since, pacer._spent_since
    # Ten accepts in a tenth of a window, all CPU spent on them: the share is
    # judged over whole windows, so the pause neither grows nor shrinks yet.
    for i in range(1, 11):
        assert pacer.after_accept(now + i * WINDOW / 100, spent + i * WINDOW / 100, 3) == pause


def test_a_share_of_one_core_turns_pacing_off():
    pacer = AcceptPacer(share=1.0)
    assert not pacer.enabled
    pauses = [pacer.after_accept(100.0 + i * STEP, 100.0 + i * STEP, 5) for i in range(5)]
    assert pauses == [0.0] * 5
    assert AcceptPacer(share=0.99).enabled
