#!/usr/bin/python3
"""Qpid Proton AMQP 1.0 sender over mutual TLS (a test peer for Drawbridge).

Sends --count messages to --address. Message i has message-id "<id-prefix><i>" (default
"proton-<i>"), a binary body sent as ONE AMQP Data section (Message.inferred = True), body bytes
b"<body-prefix><i>" (default "proton-body-<i>") optionally zero-padded to --body-size bytes,
application property "drawbridge-destination" = --destination and, if --sender-forge is given,
"drawbridge-sender" = that (forged) value. Waits for all dispositions and prints one JSON line
{"accepted":a,"rejected":r,"released":x,"modified":m}; exit 0. Connection/link errors or the
--timeout: error on stderr, exit 1.
"""
import argparse
import json
import sys

from proton import Delivery, Message, SSLDomain
from proton.handlers import MessagingHandler
from proton.reactor import Container


class Sender(MessagingHandler):
    def __init__(self, args):
        super().__init__(auto_settle=True)
        self.args = args
        self.sent = 0
        self.counts = {"accepted": 0, "rejected": 0, "released": 0, "modified": 0}
        self.error = None
        self.conn = None
        self.timer = None

    def settled(self):
        return sum(self.counts.values())

    def on_start(self, event):
        a = self.args
        domain = SSLDomain(SSLDomain.MODE_CLIENT)
        domain.set_credentials(a.cert, a.key, None)
        domain.set_trusted_ca_db(a.ca)
        domain.set_peer_authentication(SSLDomain.VERIFY_PEER, a.ca)
        self.conn = event.container.connect(
            a.url, ssl_domain=domain, sasl_enabled=True,
            allowed_mechs="EXTERNAL ANONYMOUS", reconnect=False)
        event.container.create_sender(self.conn, a.address)
        self.timer = event.container.schedule(a.timeout, self)
        if a.count == 0:
            self.finish(event)

    def on_timer_task(self, event):
        self.fail("timeout after %ss: %d sent, %d settled" % (self.args.timeout, self.sent, self.settled()))

    def on_sendable(self, event):
        a = self.args
        while event.sender.credit and self.sent < a.count:
            i = self.sent
            body = ("%s%d" % (a.body_prefix, i)).encode()
            if a.body_size and len(body) < a.body_size:
                body = body + b"\0" * (a.body_size - len(body))
            props = {"drawbridge-destination": a.destination}
            if a.sender_forge:
                props["drawbridge-sender"] = a.sender_forge
            msg = Message(id="%s%d" % (a.id_prefix, i), body=body, properties=props, durable=True)
            msg.inferred = True  # bytes body -> Data section (not amqp-value binary)
            event.sender.send(msg)
            self.sent += 1

    def on_accepted(self, event):
        self.counts["accepted"] += 1
        self.maybe_done(event)

    def on_rejected(self, event):
        self.counts["rejected"] += 1
        self.maybe_done(event)

    def on_released(self, event):
        # Proton reports MODIFIED through on_released as well.
        if event.delivery.remote_state == Delivery.MODIFIED:
            self.counts["modified"] += 1
        else:
            self.counts["released"] += 1
        self.maybe_done(event)

    def maybe_done(self, event):
        if self.settled() >= self.args.count:
            self.finish(event)

    def finish(self, event):
        if self.timer:
            self.timer.cancel()
            self.timer = None
        if self.conn:
            self.conn.close()

    def fail(self, msg):
        if self.error is None:
            self.error = msg
        if self.timer:
            self.timer.cancel()
            self.timer = None
        if self.conn:
            self.conn.close()
        self.conn = None

    def on_transport_error(self, event):
        cond = event.transport.condition
        self.fail("transport error: %s" % (cond,))
        event.container.stop()

    def on_connection_error(self, event):
        self.fail("connection error: %s" % (event.connection.remote_condition,))

    def on_session_error(self, event):
        self.fail("session error: %s" % (event.session.remote_condition,))

    def on_link_error(self, event):
        self.fail("link error: %s" % (event.link.remote_condition,))

    def on_disconnected(self, event):
        if self.settled() < self.args.count and self.error is None:
            self.fail("disconnected after %d of %d settled" % (self.settled(), self.args.count))
        event.container.stop()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="amqps://127.0.0.1:PORT")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--address", default="drawbridge.inbound")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--destination", required=True, help='e.g. "O=Bank B,L=Paris,C=FR"')
    p.add_argument("--sender-forge", default=None)
    p.add_argument("--id-prefix", default="proton-")
    p.add_argument("--body-prefix", default="proton-body-")
    p.add_argument("--body-size", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args()
    h = Sender(a)
    try:
        Container(h).run()
    except Exception as e:  # noqa: BLE001
        h.error = h.error or "exception: %r" % (e,)
    if h.error:
        print(h.error, file=sys.stderr, flush=True)
        print(json.dumps(h.counts), flush=True)
        sys.exit(1)
    print(json.dumps(h.counts), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
