"""A measured floor, not the product: the supervisor taken off a call's common path.

Loaded as ``sitecustomize`` (``PYTHONPATH={repo}/bench/lease_floor``) into the
supervisor and its workers; nothing happens unless ``LEASE_FLOOR`` is set.
It patches `fleet_ingress.net.slot_client.SlotClient` and
`fleet_ingress.net.slot_server.SlotServer` right after they load, so that the
same src runs as main and as each prototype in one window (``bench.kernel_cost
--targets ingress,ingress@hold,ingress@standing --variant hold:LEASE_FLOOR=hold
--variant hold:PYTHONPATH={repo}/bench/lease_floor ...``):

- ``LEASE_FLOOR=hold``: a worker holds the "release" and "logged" of a call that
  ended while nobody waits host-wide, and sends them with its next write (an
  "acquire") or ``ANSWERS_FLUSH`` after, as the fleets' answers already go. The
  supervisor says when its queue becomes non-empty and empty again (``{"op":
  "queue", "waiting": bool}``, to workers that said ``"holds": true``); a worker
  flushes at once then and holds nothing while it waits.
- ``LEASE_FLOOR=standing``: the above, and each worker that says ``"standing":
  true`` gets a standing grant budget (``LEASE_FLOOR_SLOTS`` a fleet, at most its
  free slots over the workers plus one) reserved in the supervisor's table (the
  fleet's ``active`` counts it: maxconn holds at every moment), from which it
  grants calls at once (`core.slot_budget.Budget`, as over an exec) and says so in
  held, batched "acquire" lines (``"budget": true``). A slot given back goes back
  into its budget (and the supervisor's reserve); when the supervisor's queue
  becomes non-empty it takes every budget back (``"budget-end"``: the worker drops
  what is left, answers ``"budget-dropped"`` after its held lines, and the
  supervisor un-reserves then), and gives budgets again once the queue is empty.
  A worker acknowledges a budget (``"budget-taken"``) before the supervisor
  counts its releases as going back into it: one stream, in order.

Not handled (a prototype): the re-execution (an exec's budget on top of a standing
one), the capacity estimate's in-flight count of reserved slots, the call lines of
budget grants before their held "acquire" is read, fleets added or removed.
``LEASE_FLOOR_COUNT_DIR``: the supervisor writes what it read (wake-ups with data,
lines by op) to ``DIR/counts-PID.json`` every second.
"""

from __future__ import annotations

import os

MODE = os.environ.get("LEASE_FLOOR", "")
COUNT_DIR = os.environ.get("LEASE_FLOOR_COUNT_DIR", "")
SLOTS = int(os.environ.get("LEASE_FLOOR_SLOTS", "8") or 8)
HELD_OPS = ("release", "logged", "acquire")  # "acquire" only with "budget": true


class _Patch:
    """Import hook: patch a module right after it is executed."""

    def __init__(self, names: dict[str, object]) -> None:
        self.names = names

    def find_spec(self, name: str, path: object, target: object = None) -> object:
        if name not in self.names:
            return None
        import importlib.util
        import sys

        patch = self.names.pop(name)
        if not self.names:
            sys.meta_path.remove(self)
        # Found by the other finders (this one skips it meanwhile).
        saved, self.names = self.names, {}
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.names = saved
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def patched(module: object) -> None:
            exec_module(module)
            patch(module)  # type: ignore[operator]

        spec.loader.exec_module = patched  # type: ignore[method-assign]
        return spec


# -- the worker's end ----------------------------------------------------------


def _patch_client(mod: object) -> None:
    from fleet_ingress.core.slot_budget import Budget, BudgetFleet
    from fleet_ingress.net.slot_wire import encode, spec_from_wire

    cls = mod.SlotClient  # type: ignore[attr-defined]
    flush_after = mod.ANSWERS_FLUSH  # type: ignore[attr-defined]
    original_handle = cls._handle
    original_end_budget = cls._end_budget

    def _write(self, message):
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        held = self.__dict__.setdefault("_lf_held", [])
        if message is not None:
            op = message.get("op")
            if op == "hello":
                message = {**message, "holds": True, "standing": MODE == "standing"}
            elif (
                op in HELD_OPS
                and (op != "acquire" or message.get("budget") is True)
                and not self.__dict__.get("_lf_waiting", False)
            ):
                held.append(encode(message))
                if self.__dict__.get("_lf_timer") is None:
                    self._lf_timer = self._loop.call_later(flush_after, _flush, self)
                return
        data = b"" if message is None else encode(message)
        if self._answers:
            data = encode({"op": "answered", "leases": self._answers}) + data
            self._answers = []
            if self._answers_timer is not None:
                self._answers_timer.cancel()
                self._answers_timer = None
        if held:  # first: an "acquire" held goes before its call's "answered"
            data = b"".join(held) + data
            held.clear()
        timer = self.__dict__.get("_lf_timer")
        if timer is not None:
            timer.cancel()
            self._lf_timer = None
        if data:
            transport.write(data)

    def _flush(self):
        self._lf_timer = None
        self._write(None)

    def _handle(self, message):
        op = message["op"]
        if op == "queue":
            self._lf_waiting = message.get("waiting") is True
            if self._lf_waiting:
                self._write(None)
            return
        if op == "budget" and message.get("standing") is True:
            fleets = [
                BudgetFleet(str(f["fleet"]), int(f["slots"]), int(f["active"]))
                for f in message["fleets"]
            ]
            for f in message["fleets"]:
                spec_from_wire(f["spec"])
            self._budget = Budget(fleets)
            self._budget_specs = {str(f["fleet"]): f["spec"] for f in message["fleets"]}
            self._lf_standing = True
            self._write({"op": "budget-taken"})
            return
        if op == "budget-end":
            self._lf_standing = False
            original_end_budget(self)
            self._write({"op": "budget-dropped"})
            return
        original_handle(self, message)

    def _end_budget(self):
        if self.__dict__.get("_lf_standing"):
            return  # a prototype: the exec's "sync" leaves a standing budget alone
        original_end_budget(self)

    cls._write = _write
    cls._handle = _handle
    cls._end_budget = _end_budget


# -- the supervisor's end ------------------------------------------------------


def _patch_server(mod: object) -> None:
    import json
    import time

    from fleet_ingress.core.slot_budget import free_slots
    from fleet_ingress.net.slot_wire import field, spec_to_wire

    cls = mod.SlotServer  # type: ignore[attr-defined]
    channel_cls = mod._Channel  # type: ignore[attr-defined]
    original_handle = cls._handle
    original_arm = cls._arm
    original_gone = cls._gone
    counts: dict[str, int] = {}
    last = [0.0]

    if COUNT_DIR:
        original_received = channel_cls.data_received

        def data_received(self, data):
            counts["reads"] = counts.get("reads", 0) + 1
            original_received(self, data)
            now = time.monotonic()
            if now - last[0] >= 1.0:
                last[0] = now
                path = os.path.join(COUNT_DIR, f"counts-{os.getpid()}.json")
                with open(path + ".tmp", "w") as f:
                    json.dump(counts, f)
                os.replace(path + ".tmp", path)

        channel_cls.data_received = data_received

    def lf(self):
        state = self.__dict__.get("_lf")
        if state is None:
            # waiting: what the workers were last told; budgets: channel key ->
            # "sent" | "taken"; reserved: key -> {negative id: fleet};
            # leases: key -> lease ids granted from a budget while it stood.
            state = self._lf = {
                "waiting": False,
                "budgets": {},
                "reserved": {},
                "ids": {},
                "fleets": {},
            }
        return state

    def _reserve(self, key):
        """A standing budget for channel `key`: reserved in the table, then sent."""
        state = lf(self)
        channel = self._channels.get(key)
        row = self.slots.get(key)
        if channel is None or row is None or key in state["budgets"]:
            return
        takers = [k for k, c in self._channels.items() if c.__dict__.get("lf_standing")]
        fleets = []
        reserved = state["reserved"].setdefault(key, {})
        for fleet in self.slots.balancer.fleets:
            slots = min(SLOTS, free_slots(fleet) // (len(takers) + 1))
            if slots <= 0:
                continue
            active_before = fleet.active
            for _ in range(slots):
                state["ids"][key] = state["ids"].get(key, 0) - 1
                reserved[state["ids"][key]] = fleet
                fleet.active += 1
            fleets.append(
                {
                    "fleet": fleet.name,
                    "slots": slots,
                    "active": active_before,
                    "spec": spec_to_wire(fleet.spec),
                }
            )
            channel.sent_specs[fleet.name] = fleet.spec
        if fleets:
            state["budgets"][key] = "sent"
            state["fleets"][key] = {f["fleet"] for f in fleets}
            channel.send({"op": "budget", "standing": True, "fleets": fleets})

    def _unreserve(self, key):
        state = lf(self)
        state["budgets"].pop(key, None)
        state["fleets"].pop(key, None)
        for fleet in state["reserved"].pop(key, {}).values():
            fleet.active -= 1

    def _handle(self, channel, message):
        op = message["op"]
        if COUNT_DIR:
            counts[str(op)] = counts.get(str(op), 0) + 1
        state = lf(self)
        key = channel.key
        if op == "hello":
            original_handle(self, channel, message)
            channel.lf_holds = message.get("holds") is True
            channel.lf_standing = message.get("standing") is True
            if channel.lf_holds and state["waiting"]:
                channel.send({"op": "queue", "waiting": True})
            if channel.lf_standing and not state["waiting"] and not self.slots.queue_length:
                _reserve(self, key)
            return
        budget = state["budgets"].get(key)
        if op == "budget-taken":
            if budget == "sent":
                state["budgets"][key] = "taken"
            return
        if op == "budget-dropped":
            _unreserve(self, key)
            self._send(self.slots.wake())
            return
        if op == "acquire" and message.get("budget") is True and not channel.restoring:
            lease = field(message, "id", int)
            name = field(message, "fleet", str)
            reserved = state["reserved"].get(key, {})
            slot = next((i for i, f in reserved.items() if f.name == name), None)
            row = self.slots.get(key)
            if slot is None or row is None:
                raise mod.WireError(f"budget grant on {name!r} beyond the budget")
            fleet = reserved.pop(slot)
            fleet.active -= 1  # the reserve's slot becomes the lease's
            self.slots.balancer.open(fleet, (key, lease) if row.tells_answers else None)
            row.held[lease] = fleet
            row.granted_total += 1
            if isinstance(call := message.get("call"), dict):
                self._calls.setdefault(key, {})[lease] = mod.call_kept(call)
            return
        if op == "release" and budget == "taken":
            lease = field(message, "id", int)
            row = self.slots.get(key)
            fleet = None if row is None else row.held.get(lease)
            # `Budget.give_back` takes only a fleet of the budget's.
            if fleet is not None and fleet.name in state["fleets"].get(key, ()):
                del row.held[lease]
                # Back into the worker's budget (it grants it again), still reserved.
                self._forget_call(key, lease)
                self.slots.balancer.close(fleet, (key, lease))
                fleet.active += 1
                state["ids"][key] = state["ids"].get(key, 0) - 1
                state["reserved"].setdefault(key, {})[state["ids"][key]] = fleet
                return
        original_handle(self, channel, message)

    def _arm(self):
        original_arm(self)
        state = lf(self)
        waiting = self.slots.queue_length > 0
        if waiting == state["waiting"]:
            return
        state["waiting"] = waiting
        for key, channel in list(self._channels.items()):
            if channel.__dict__.get("lf_holds"):
                channel.send({"op": "queue", "waiting": waiting})
            if not channel.__dict__.get("lf_standing"):
                continue
            if waiting and key in state["budgets"]:
                channel.send({"op": "budget-end"})
            elif not waiting and key not in state["budgets"]:
                _reserve(self, key)

    def _gone(self, channel):
        _unreserve(self, channel.key)
        original_gone(self, channel)

    cls._handle = _handle
    cls._arm = _arm
    cls._gone = _gone


if MODE or COUNT_DIR:
    import sys

    names: dict[str, object] = {"fleet_ingress.net.slot_server": _patch_server}
    if MODE:
        names["fleet_ingress.net.slot_client"] = _patch_client
    sys.meta_path.insert(0, _Patch(names))
