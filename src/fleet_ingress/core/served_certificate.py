"""What `check --live` reads of the certificate a TLS handshake was served: its
serial, subject CN and validity dates, from the DER bytes (`getpeercert(True)`),
and whether it is valid now. Pure.

Read here with a few lines of DER rather than with `cryptography`: the check runs
every second on each host of a pair (keepalived's track script) and that import
alone cost more than the rest of the check. The ssl module gives only the bytes
of a certificate it did not verify (and it cannot verify it: the check connects
to loopback, not to the name on the certificate).
"""

from __future__ import annotations

import time
from typing import NamedTuple

_SEQUENCE, _SET, _INTEGER, _OID = 0x30, 0x31, 0x02, 0x06
_UTC_TIME, _GENERALIZED_TIME = 0x17, 0x18
_COMMON_NAME = bytes([0x55, 0x04, 0x03])  # 2.5.4.3


class CertificateFacts(NamedTuple):
    serial: int
    common_name: str  # "" when the subject has none
    not_before: int  # seconds since the epoch, UTC
    not_after: int

    def problem(self, now: float) -> str:
        """Why carriers refuse it at `now` ("" when they would not for its dates).

        Its expiry only. A start after `now` is this host's clock behind (NTP not
        synced yet) as much as a certificate issued for later (CAs backdate, so it
        is rarely that): carriers with a right clock accept the first, and failing
        here would move the address, cutting every call on the host, for this
        host's clock (review38a). `stat` says it (certificate_change.clock_before)."""
        if now >= self.not_after:
            return f"expired {utc_text(self.not_after)}"
        return ""

    def name(self) -> str:
        """As an operator finds it: `openssl x509 -serial -subject` shows these."""
        serial = f"{self.serial:X}"
        return f"serial {serial}" + (f", CN {self.common_name}" if self.common_name else "")


def utc_text(when: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


def certificate_facts(der: bytes) -> CertificateFacts:
    """Raises ValueError when `der` is not an X.509 certificate this can read."""
    try:
        return _facts(der)
    except (IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a readable certificate ({exc})") from None


def _facts(der: bytes) -> CertificateFacts:
    _, cert, _ = _expect(der, 0, _SEQUENCE)
    _, tbs, tbs_end = _expect(der, cert, _SEQUENCE)
    at = tbs
    if der[at] == 0xA0:  # [0] version
        at = _element(der, at)[2]
    _, serial_at, serial_end = _expect(der, at, _INTEGER)
    serial = int.from_bytes(der[serial_at:serial_end], "big", signed=True)
    at = _expect(der, serial_end, _SEQUENCE)[2]  # signature algorithm
    at = _expect(der, at, _SEQUENCE)[2]  # issuer
    _, validity, at = _expect(der, at, _SEQUENCE)
    not_before, after_at = _time(der, validity)
    not_after, _ = _time(der, after_at)
    _, subject, subject_end = _expect(der, at, _SEQUENCE)
    if subject_end > tbs_end:
        raise ValueError("not a readable certificate (subject past its end)")
    return CertificateFacts(serial, _common_name(der, subject, subject_end), not_before, not_after)


def _element(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of the content, end of the content) of the element at `at`."""
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4:
            raise ValueError("not a readable certificate (a length of that size)")
        length = int.from_bytes(der[at : at + count], "big")
        at += count
    if at + length > len(der):
        raise ValueError("not a readable certificate (cut short)")
    return tag, at, at + length


def _expect(der: bytes, at: int, tag: int) -> tuple[int, int, int]:
    found = _element(der, at)
    if found[0] != tag:
        raise ValueError(f"not a readable certificate (tag {found[0]:#x} at {at}, not {tag:#x})")
    return found


def _time(der: bytes, at: int) -> tuple[int, int]:
    tag, start, end = _element(der, at)
    text = der[start:end].decode("ascii")
    if tag == _UTC_TIME and len(text) == 13 and text.endswith("Z"):
        year = int(text[:2])
        year += 1900 if year >= 50 else 2000  # RFC 5280 4.1.2.5.1
        rest = text[2:12]
    elif tag == _GENERALIZED_TIME and len(text) == 15 and text.endswith("Z"):
        year, rest = int(text[:4]), text[4:14]
    else:
        raise ValueError(f"not a readable certificate (a time {text!r})")
    month, day, hour, minute, second = (int(rest[i : i + 2]) for i in range(0, 10, 2))
    days = _days_from_civil(year, month, day)
    return ((days * 24 + hour) * 60 + minute) * 60 + second, end


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 (Howard Hinnant's algorithm; no datetime import)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _common_name(der: bytes, at: int, end: int) -> str:
    while at < end:
        _, rdn, at = _expect(der, at, _SET)
        _, attribute, _ = _expect(der, rdn, _SEQUENCE)
        _, oid, oid_end = _expect(der, attribute, _OID)
        if der[oid:oid_end] == _COMMON_NAME:
            _, value, value_end = _element(der, oid_end)
            return der[value:value_end].decode("utf-8", "replace")
    return ""
