"""Whether a reload may swap the carrier listener's certificate for a new one (no I/O).

`load_cert_chain` refuses what OpenSSL cannot load (a key that does not match,
a truncated PEM). It takes anything else, and a reload that applies it drops
the certificate in use for good: a renewal gone wrong (certbot's live/ pointed
at an expired certificate, one not valid yet, or one issued for another name)
then fails every new carrier's handshake until someone notices. Those are
refused here, the certificate in use kept serving. A certificate that covers
only some of the names of the one in use is taken: moving names between
certificates is an operator's choice, and carriers dialing a name it still
covers are served.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# A certificate a few minutes from valid is served: this host's clock or the CA's
# may be a little off, as certbot's own renewals issue certificates valid from "now".
CLOCK_SKEW = 300.0


@dataclass(frozen=True)
class LeafFacts:
    """What a reload judges of a certificate (the first of its PEM file)."""

    not_before: float  # epoch seconds
    not_after: float
    names: frozenset[str]  # DNS names (lowercase, wildcards kept) and IP addresses it is for
    # SHA-256 of its DER: a renewal issued within the same second, for the same
    # names, is still another certificate.
    fingerprint: str = ""


def renewal_waiting(on_disk: LeafFacts | None, serving: LeafFacts | None) -> bool:
    """Whether the certificate file holds a renewal not served: another
    certificate, valid for longer than the one carriers get now (a reload that
    failed or never ran: certbot does not run its deploy hook twice)."""
    return (
        on_disk is not None
        and serving is not None
        and on_disk.fingerprint != serving.fingerprint
        and on_disk.not_after > serving.not_after
    )


def renewal_problem(new: LeafFacts, serving: LeafFacts | None, now: float) -> str | None:
    """Why `new` must not replace `serving` (the certificate carriers get now), or None.
    The one in use again is never refused: an expired one must not block a reload
    that changes only the fleets (the review of session 12)."""
    if new == serving:
        return None
    if (stale := out_of_date(new, now)) is not None:
        return stale
    # A certificate in use that has expired serves no carrier: any names may follow it.
    if serving is not None and serving.names and new.names and now <= serving.not_after:
        if not any(_overlap(a, b) for a in serving.names for b in new.names):
            return (
                f"is for {_listed(new.names)}, none of the names of the certificate in "
                f"use ({_listed(serving.names)}): carriers dialing those would fail to "
                "verify it (to move to other names, serve one certificate for both "
                "while carriers move)"
            )
    return None


def out_of_date(leaf: LeafFacts, now: float) -> str | None:
    """Why every carrier would refuse `leaf` at `now` (expired, or not valid yet
    beyond CLOCK_SKEW), or None."""
    if now < leaf.not_before - CLOCK_SKEW:
        return (
            f"is not valid until {_utc(leaf.not_before)} and this host's clock reads "
            f"{_utc(now)}: carriers would refuse it, unless this clock is behind (check "
            "it: `timedatectl`, `chronyc tracking`)"
        )
    if now > leaf.not_after:
        return f"expired on {_utc(leaf.not_after)}"
    return None


def clock_before(leaf: LeafFacts, now: float) -> str | None:
    """What is known of a certificate served whose notBefore this host's clock
    reads before (beyond CLOCK_SKEW), or None. A clock behind (a boot before
    chrony syncs) looks the same from here as a certificate issued for later:
    carriers with a right clock accept the first, refuse the second. CAs do
    not issue certificates for later (they backdate notBefore), so the clock is
    the first thing to check; `stat` said "refused by carriers" and "put a good
    certificate in place" of one they accepted (leftovers of session 36)."""
    if now >= leaf.not_before - CLOCK_SKEW:
        return None
    return (
        f"is valid from {_utc(leaf.not_before)}, and this host's clock reads {_utc(now)}: "
        "carriers with a right clock accept it if this host's clock is behind (NTP not "
        "synced yet: check it with `timedatectl`, `chronyc tracking`); if the clock is "
        "right, the certificate is issued for later and every carrier refuses it until then"
    )


def kept_over_restart(
    on_disk: LeafFacts, served: LeafFacts, now: float, chain: str | None = None
) -> str | None:
    """At a start after a stop (`systemctl restart`): why the certificate on disk
    must not replace `served`, the one carriers got before the stop, or None
    (the files serve). What a reload refuses (`renewal_problem`; and `chain`,
    why carriers may fail to verify the chain on disk where they verify the
    served one's, as the unit's reload check refuses it), a restart does not
    put in place of a certificate carriers still accept; once that one is out
    of date itself, the files serve whatever they hold."""
    if out_of_date(served, now) is not None:
        return None
    # The same leaf may come with another chain: `chain` judges the whole file.
    return renewal_problem(on_disk, served, now) or chain


# A reload that read the certificate served, in files that changed (an
# intermediate added or dropped, the key file written anew): new handshakes get
# what was read, so "nothing changed" would be wrong.
CHAIN_CHANGED = (
    "the same certificate, its files changed (its chain or key): new handshakes get them "
    "as read now"
)


def reload_note(
    new: LeafFacts | None,
    serving: LeafFacts | None,
    new_files: object,
    serving_files: object,
) -> str | None:
    """What a reload says of the certificate: `change_note`, or CHAIN_CHANGED
    when the same certificate came in files (`new_files`, as read: a
    CarrierPem) other than those served; None when nothing changed or none is
    served yet (`serving_files` None)."""
    if note := change_note(new, serving):
        return note
    if serving_files is not None and new_files != serving_files:
        return CHAIN_CHANGED
    return None


def change_note(new: LeafFacts | None, serving: LeafFacts | None) -> str | None:
    """What a reload that applies `new` says of the certificate, None when it is the
    one in use: after a renewal `fleet-ingress reload` and the journal say so, with
    the dates (and the names, when they moved), rather than "no fleet changes"."""
    if new is None or new == serving:
        return None
    note = f"new certificate for new handshakes: valid until {_utc(new.not_after)}"
    if serving is None:
        return note
    if new.not_after != serving.not_after:
        note += f" (the one before: until {_utc(serving.not_after)})"
    if new.names != serving.names:
        note += f", for {_listed(new.names)} (was {_listed(serving.names)})"
    return note


def covers(pattern: str, name: str) -> bool:
    """Whether a certificate name matches `name` as a client checks it (RFC 6125):
    exactly, or a wildcard `*.` standing for one whole leftmost label."""
    pattern, name = pattern.lower(), name.lower()
    if pattern == name:
        return True
    if pattern.startswith("*.") and not name.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return False


def _overlap(a: str, b: str) -> bool:
    """Whether some host name is covered by both certificate names."""
    return covers(a, b) or covers(b, a)


def _listed(names: frozenset[str]) -> str:
    shown = sorted(names)
    return ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))
