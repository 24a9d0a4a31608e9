#!/usr/bin/python3
"""Qpid Proton AMQP 1.0 TLS listener that requires client certificates (a test peer).

Listens on --listen HOST:PORT (prints "LISTENING" once listening), accepts links to any address,
prints one JSON line per message and accepts it:
{"id": ..., "body_hex": ..., "body_kind": "data"|"value", "properties": {...application properties...},
 "address": ..., "peer_subject": "O=...,L=...,C=..."}
Exit 0 after --count messages, 2 on --timeout (seconds), 1 on errors.
Body: Data sections/binary are hex of the bytes; a string body is hex of its UTF-8; other
amqp-value bodies are hex of their JSON/str rendering.
"""
import argparse
import json
import sys

from proton import SSLDomain
from proton.handlers import MessagingHandler
from proton.reactor import Container


def jsonable(v):
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def body_bytes(body):
    if body is None:
        return b""
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    return str(body).encode()


class Receiver(MessagingHandler):
    def __init__(self, args):
        super().__init__(auto_accept=True)
        self.args = args
        self.received = 0
        self.exit_code = 0
        self.acceptor = None

    def on_start(self, event):
        a = self.args
        domain = SSLDomain(SSLDomain.MODE_SERVER)
        domain.set_credentials(a.cert, a.key, None)
        domain.set_trusted_ca_db(a.ca)
        domain.set_peer_authentication(SSLDomain.VERIFY_PEER, a.ca)
        event.container.ssl.server = domain
        self.acceptor = event.container.listen("amqps://%s" % a.listen)
        event.container.schedule(a.timeout, self)
        print("LISTENING", flush=True)
        if a.count == 0:
            self.stop(event.container, 0)

    def on_connection_bound(self, event):
        # Server-side SASL: identity comes from the TLS client certificate.
        try:
            sasl = event.transport.sasl()
            sasl.allowed_mechs("EXTERNAL ANONYMOUS")
        except Exception as e:  # noqa: BLE001
            print("sasl setup: %r" % (e,), file=sys.stderr, flush=True)

    def on_timer_task(self, event):
        print("timeout after %ss with %d of %d messages" % (self.args.timeout, self.received, self.args.count),
              file=sys.stderr, flush=True)
        self.stop(event.container, 2)

    def on_message(self, event):
        m = event.message
        subject = None
        try:
            ssl = event.transport.ssl() if event.transport else None
            subject = ssl.remote_subject if ssl else None
        except Exception:  # noqa: BLE001
            subject = None
        address = m.address
        if address is None and event.link is not None:
            address = event.link.remote_target.address or event.link.target.address
        line = {
            "id": jsonable(m.id),
            "body_hex": body_bytes(m.body).hex(),
            # "data": Data section(s); "value": an amqp-value section
            "body_kind": "data" if (m.inferred and isinstance(m.body, (bytes, bytearray, memoryview))) else "value",
            "properties": jsonable(m.properties or {}),
            "address": address,
            "peer_subject": subject,
        }
        print(json.dumps(line), flush=True)
        self.received += 1
        if self.received >= self.args.count:
            # accept happens after this handler returns; stop on the next tick
            event.container.schedule(0.2, StopTask(self, 0))

    def on_transport_error(self, event):
        print("transport error: %s" % (event.transport.condition,), file=sys.stderr, flush=True)

    def stop(self, container, code):
        self.exit_code = code
        container.stop()


class StopTask:
    def __init__(self, receiver, code):
        self.receiver = receiver
        self.code = code

    def on_timer_task(self, event):
        self.receiver.stop(event.container, self.code)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, help="127.0.0.1:PORT")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args()
    h = Receiver(a)
    try:
        Container(h).run()
    except KeyboardInterrupt:
        pass
    sys.exit(h.exit_code)


if __name__ == "__main__":
    main()
