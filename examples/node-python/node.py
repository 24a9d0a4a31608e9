#!/usr/bin/python3
"""A Drawbridge node in Python: what `drawbridge-node` (Rust) does, with pika and the Python
classes generated from the same control.proto (control_pb2.py next to this file).

It connects to the node's RabbitMQ broker and
  1. declares the peer queue with the arguments the bridge expects
     (x-single-active-consumer, x-queue-type, and dead-lettering into drawbridge.dead-letter),
  2. listens on the drawbridge.notify fanout exchange for the bridge's SnapshotRequests,
  3. publishes a CreateLink for the link, sequenced and with user_id = its broker login
     (RabbitMQ rejects a user_id that is not the connection's login, so the bridge can trust it),
  4. publishes --count peer messages to the peer queue: persistent, with message_id
     "<run>-<i:08>" and the header drawbridge-destination = --destination, publisher-confirmed,
  5. answers SnapshotRequests with a Snapshot of its links until it has answered --answer of
     them or --timeout seconds passed,
and prints one JSON line: {"published": n, "snapshots_answered": k, "sequences": [...]}.

Sequence rule (see control.proto): one source per node identity that never goes backwards,
also across restarts: max(last + 1, wall clock in ms). A snapshot takes its sequence *before*
the node reads the link set it lists; a create or delete takes it *after* the change. Each
source also sends its epoch, a random non-zero 64-bit id: a bridge starts its order again at an
epoch it has not seen, so a restarted node is obeyed even if its old numbers ran ahead.

Run with Debian's interpreter and packages (python3-pika, python3-protobuf):
    /usr/bin/python3 examples/node-python/node.py --broker amqp://node-a:secret@127.0.0.1:5672/%2f \
        --identity "O=Bank A, L=London, C=GB" --queue drawbridge.peers.bank-b \
        --target 127.0.0.1:5671 --legal-name "O=Bank B, L=Paris, C=FR" \
        --destination "O=Bank B, L=Paris, C=FR" --count 10
"""
import argparse
import json
import sys
import threading
import time
import uuid

import pika

import control_pb2 as pb

PROTOCOL_VERSION = 1
CONTROL_EXCHANGE = "drawbridge.control"
NOTIFY_EXCHANGE = "drawbridge.notify"
CONTENT_TYPE = "application/x-protobuf"
DESTINATION = "drawbridge-destination"


class SequenceSource:
    """Strictly increasing numbers, at least the wall clock in milliseconds, and an epoch."""

    def __init__(self):
        self._last = 0
        self._lock = threading.Lock()
        self.epoch = (uuid.uuid4().int & (2**64 - 1)) or 1

    def next(self):
        with self._lock:
            self._last = max(self._last + 1, int(time.time() * 1000))
            return self._last


class Node:
    """The node's side of the control protocol on one pika channel."""

    def __init__(self, channel, identity, user, inbox_queues):
        self.channel = channel
        self.identity = identity
        self.user = user
        self.inbox_queues = list(inbox_queues)
        self.sequence = SequenceSource()
        self.links = {}  # queue -> pb.PeerLink: the link set the node wants
        self.sequences = []

    def _publish(self, sequence, **body):
        msg = pb.ControlMessage(
            version=PROTOCOL_VERSION, sequence=sequence, epoch=self.sequence.epoch, **body
        )
        self.channel.basic_publish(
            exchange=CONTROL_EXCHANGE,
            routing_key="",
            body=msg.SerializeToString(),
            properties=pika.BasicProperties(content_type=CONTENT_TYPE, user_id=self.user),
        )
        self.sequences.append(sequence)
        return sequence

    def create_link(self, link):
        self.links[link.queue] = link
        # After the change: a snapshot taken before it has a lower number.
        seq = self.sequence.next()
        return self._publish(
            seq, create_link=pb.CreateLink(node_identity=self.identity, link=link)
        )

    def delete_link(self, queue):
        self.links.pop(queue, None)
        seq = self.sequence.next()
        return self._publish(
            seq, delete_link=pb.DeleteLink(node_identity=self.identity, queue=queue)
        )

    def snapshot(self):
        # Before reading the link set: a change after this read gets a higher number.
        seq = self.sequence.next()
        snap = pb.Snapshot(
            node_identity=self.identity,
            inbox_queues=self.inbox_queues,
            links=list(self.links.values()),
        )
        return self._publish(seq, snapshot=snap)


def declare_peer_queue(channel, queue, queue_type):
    channel.queue_declare(
        queue=queue,
        durable=True,
        # The same arguments as the bridge's (a redeclare with other arguments is refused).
        # The dead-letter pair turns whatever the broker drops from the queue (a quorum
        # queue's delivery limit, a TTL or length policy) into a dead-letter, not a loss.
        arguments={
            "x-single-active-consumer": True,
            "x-queue-type": queue_type,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "drawbridge.dead-letter",
        },
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--broker", required=True, help="amqp://user:password@host:port/vhost")
    p.add_argument("--identity", required=True, help="the node's legal name")
    p.add_argument("--queue", required=True, help="peer queue, e.g. drawbridge.peers.bank-b")
    p.add_argument("--queue-type", default="classic", help="x-queue-type of the peer queue")
    p.add_argument("--target", action="append", required=True, help="peer float host:port")
    p.add_argument("--legal-name", action="append", required=True, help="peer legal name")
    p.add_argument("--destination", required=True, help="drawbridge-destination of messages")
    p.add_argument("--inbox", default="drawbridge.inbox", help="the node's inbox queue")
    p.add_argument("--count", type=int, default=10, help="peer messages to send")
    p.add_argument("--run", default="py", help="message ids are <run>-<i:08>")
    p.add_argument("--answer", type=int, default=1, help="snapshot requests to answer")
    p.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds")
    a = p.parse_args()

    params = pika.URLParameters(a.broker)
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.confirm_delivery()
    node = Node(ch, a.identity, params.credentials.username, [a.inbox])

    declare_peer_queue(ch, a.queue, a.queue_type)
    ch.exchange_declare(exchange=CONTROL_EXCHANGE, exchange_type="fanout", durable=True)
    ch.exchange_declare(exchange=NOTIFY_EXCHANGE, exchange_type="fanout", durable=True)
    # Named after the exchange (not server-named) so broker permissions can tell a node's
    # notify queues from a bridge's control queues (see deploy/rabbitmq/README.md).
    notify = f"{NOTIFY_EXCHANGE}.{uuid.uuid4().hex}"
    ch.queue_declare(queue=notify, exclusive=True, auto_delete=True)
    ch.queue_bind(queue=notify, exchange=NOTIFY_EXCHANGE)

    node.create_link(
        pb.PeerLink(queue=a.queue, targets=a.target, legal_names=a.legal_name)
    )

    for i in range(a.count):
        ch.basic_publish(
            exchange="",
            routing_key=a.queue,
            body=("%s message %d" % (a.run, i)).encode(),
            properties=pika.BasicProperties(
                delivery_mode=2,
                message_id="%s-%08d" % (a.run, i),
                headers={DESTINATION: a.destination},
            ),
            mandatory=True,
        )

    answered = 0
    deadline = time.monotonic() + a.timeout
    while answered < a.answer:
        left = deadline - time.monotonic()
        if left <= 0:
            print("timed out waiting for snapshot requests", file=sys.stderr)
            return 1
        for method, _props, body in ch.consume(notify, auto_ack=True, inactivity_timeout=min(left, 1.0)):
            if method is None:
                break
            msg = pb.NotifyMessage.FromString(body)
            if msg.WhichOneof("body") == "snapshot_request":
                node.snapshot()
                answered += 1
                break
    ch.cancel()
    print(json.dumps({"published": a.count, "snapshots_answered": answered, "sequences": node.sequences}))
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
