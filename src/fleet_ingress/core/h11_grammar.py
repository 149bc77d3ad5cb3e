"""h11's own grammar (its private `_abnf`), imported here and nowhere else.

What the ingress reads or writes without h11 on a call's path (the carrier's
head, `request_head`; the fleet's request and its 101, `fleet_exchange`) is
only what matches the very expressions h11 reads and writes by, so h11 would
have read or written it the same way: a verdict never depends on which of the
two did it. One import site, so that an h11 release that moves or renames
`_abnf` breaks here, once, at import.
"""

from __future__ import annotations

from h11 import _abnf

OWS: str = _abnf.OWS
FIELD_NAME: str = _abnf.field_name
FIELD_CONTENT: str = _abnf.field_content
FIELD_VALUE: str = _abnf.field_value  # FIELD_CONTENT or nothing, in a capturing group
METHOD: str = _abnf.method
REQUEST_TARGET: str = _abnf.request_target
REASON_PHRASE: str = _abnf.reason_phrase
