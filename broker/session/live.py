"""Rights that change while the client stays connected: a reload, an operator's revoke, a platform answer.

:meth:`Live.replace_policy` swaps the session's access policy in place: what the session remembered as
allowed (its fast-path topic caches, the deny log bound to the old policy) is dropped, so every later
packet is checked against the new rights; subscriptions the new policy no longer grants are taken away
upstream by an UNSUBSCRIBE the front broker sends on the client's behalf (its UNSUBACK stays here, see
:class:`broker.session.flows.Subscriptions`). Deliveries still on their way on such a filter are checked
against the new policy like every delivery. The client is not told (MQTT has no packet for it); a client
that must go is disconnected with :meth:`broker.session.base.SessionBase.disconnect` instead.
"""

from __future__ import annotations

import logging

from broker.logs import log_event
from broker.mqtt.packets import Unsubscribe, encode_unsubscribe
from broker.mqtt.reasons import DisconnectReason
from broker.session.api import AccessPolicy, State
from broker.session.paths import Paths

log = logging.getLogger("mqtt_front.session")


class Live(Paths):
    __slots__ = ()

    @property
    def subscriptions(self) -> list[str]:
        """The client-visible filters the client holds (granted by the front broker), in the order given."""
        return list(self._subs.filters)

    def replace_policy(self, policy: AccessPolicy) -> list[str]:
        """Check everything from now on against ``policy``; returns the filters it revoked.

        A filter the new policy cannot decide at once (the platform, asked asynchronously) is kept: its
        deliveries are still checked one by one.
        """
        if self._state is State.CLOSED:
            return []
        self.policy = policy
        self._fast_expired = getattr(policy, "fast_paths_expired", None)
        self._publish_ok.clear()
        self._publish_ok_retained.clear()
        self._receive_ok.clear()
        self._decided.clear()
        self._decided_down.clear()
        self._deny_log = None  # it explains denials with the policy it was made with
        will = self._connect.will if self._connect is not None else None
        if will is not None and policy.check_publish(will.topic, will.retain) is False:
            # The will is registered upstream and cannot be changed: end the session without it. The client
            # reconnects, and its CONNECT (with that will) meets the new rules.
            self.stats.denied_will += 1
            self.disconnect(DisconnectReason.NOT_AUTHORIZED, "will topic no longer allowed", discard_will=True)
            return []
        revoked = [f for f in self._subs.filters if policy.check_subscribe(f) is False]
        return self.revoke_filters(revoked)

    def revoke_filters(self, filters: list[str]) -> list[str]:
        """Take these subscriptions away (those the client holds): an UNSUBSCRIBE upstream on its behalf.

        For a policy that decides asynchronously (the platform): the I/O layer asks it about the
        client's filters again from time to time, and revokes the ones it now refuses here.
        """
        revoked = [f for f in filters if f in self._subs.filters]
        if not revoked or self._state is State.CLOSED:
            return []
        flow = self._subs.revoke(revoked, self._acks.inflight.keys())
        if flow is None:  # every packet id is taken by a flow in progress: cannot unsubscribe, so end it
            self.disconnect(DisconnectReason.NOT_AUTHORIZED, "subscriptions revoked")
            return revoked
        packet_id, upstream_filters = flow
        self._out_upstream.append(encode_unsubscribe(Unsubscribe(packet_id, upstream_filters, {}), self.v5))
        self.stats.denied_subscribe += len(revoked)
        log_event(
            log,
            logging.INFO,
            "subscriptions_revoked",
            peer=self.peer,
            user=self.username,
            client=self.client_id,
            team=self.team,
            filters=len(revoked),
            first=revoked[0],
        )
        return revoked
