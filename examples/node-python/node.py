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

With --receive-stream QUEUE it reads its stream inbox instead (float.inbox_queue_type =
"stream"; see "Reading a stream inbox" below) and prints one JSON line with what it read:
{"read": n, "ids": [...], "first_offset": a, "last_offset": b, "markers_skipped": k,
 "senders": {name: count}, "start": "first" or an offset, "committed": c}.

Sequence rule (see control.proto): one source per node identity that never goes backwards,
also across restarts: max(last + 1, wall clock in ms). A snapshot takes its sequence *before*
the node reads the link set it lists; a create or delete takes it *after* the change. Each
source also sends its epoch, a random non-zero 64-bit id: a bridge starts its order again at an
epoch it has not seen, so a restarted node is obeyed even if its old numbers ran ahead.

Reading a stream inbox: a stream keeps what is read (acks only give the consumer credit) and
the broker keeps no position for the node, so the node keeps its own: --offset-file holds the
offset of the last message it processed (one decimal number and a newline, as the Rust
library's OffsetFile), written to a temporary file, fsynced and renamed over the old one after
each message. A restart consumes from that offset + 1 (x-stream-offset); without the file from
the stream's first message. A corrupt file stops the node: it never silently reads from the
start again. The float's window markers (header drawbridge-window-marker, empty, no sender) are
skipped, their offsets committed too. Reading is at least once: a crash after processing a
message and before its offset is written processes it again, so keep processing idempotent or
write the offset in the same transaction as its effect.
    /usr/bin/python3 examples/node-python/node.py --broker amqp://node-b:secret@127.0.0.1:5672/%2f \
        --receive-stream drawbridge.inbox --offset-file /var/lib/node-b/inbox.offset \
        --expect 10 --timeout 30

Run with Debian's interpreter and packages (python3-pika, python3-protobuf):
    /usr/bin/python3 examples/node-python/node.py --broker amqp://node-a:secret@127.0.0.1:5672/%2f \
        --identity "O=Bank A, L=London, C=GB" --queue drawbridge.peers.bank-b \
        --target 127.0.0.1:5671 --legal-name "O=Bank B, L=Paris, C=FR" \
        --destination "O=Bank B, L=Paris, C=FR" --count 10
"""
import argparse
import json
import os
import re
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
SENDER = "drawbridge-sender"
WINDOW_MARKER = "drawbridge-window-marker"
STREAM_OFFSET = "x-stream-offset"


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


class OffsetFile:
    """The offset of the last processed message of a stream inbox, kept in a file."""

    def __init__(self, path):
        self.path = path
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self.last = None
            return
        if not re.fullmatch(rb"[0-9]+\n", data):
            # Never "start again from the first message": that would process everything
            # again (and from "next" would skip what is unread).
            raise SystemExit(
                "offset file %s is corrupt (%r): it must hold one number, the offset of the "
                "last message processed; restore it, or remove it to read from the first"
                % (path, data[:40])
            )
        self.last = int(data)

    def commit(self, offset):
        """Durably record `offset` as processed: temp file, fsync, rename, fsync the dir."""
        if self.last is not None and offset <= self.last:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(b"%d\n" % offset)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.last = offset


def receive_stream(a):
    """Read the stream inbox a.receive_stream from the offset after a.offset_file's, until
    a.expect messages were read (0: no limit) or a.timeout seconds passed."""
    store = OffsetFile(a.offset_file)
    start = store.last + 1 if store.last is not None else "first"
    conn = pika.BlockingConnection(pika.URLParameters(a.broker))
    ch = conn.channel()
    # Mandatory on a stream: the broker sends at most this many unacked messages.
    ch.basic_qos(prefetch_count=a.prefetch)
    ack_every = max(1, (a.prefetch + 1) // 2)
    ids, senders, markers = [], {}, 0
    first = last = None
    unacked, tag = 0, None
    stopping = False
    deadline = time.monotonic() + a.timeout
    for method, props, _body in ch.consume(
        a.receive_stream, arguments={STREAM_OFFSET: start}, inactivity_timeout=0.5
    ):
        if stopping:
            # Stopping: take what the broker sent already, without processing it (it is
            # read again next time) and without giving credit back, until nothing more comes.
            # Then nothing is left for pika to reject when it cancels the consumer: it
            # rejects undelivered messages, and a stream answers basic.reject by closing the
            # connection.
            if method is None:
                break
            continue
        if method is not None:
            headers = props.headers or {}
            offset = headers.get(STREAM_OFFSET)
            if not isinstance(offset, int):
                # Not a stream, or not RabbitMQ's stream: no ack (a queue would drop it).
                print("%s is not a stream: no %s on a delivery" % (a.receive_stream, STREAM_OFFSET),
                      file=sys.stderr)
                return 1
            # Acks only give credit back; what was processed is the offset file's.
            unacked, tag = unacked + 1, method.delivery_tag
            if unacked >= ack_every:
                ch.basic_ack(delivery_tag=tag, multiple=True)
                unacked = 0
            if store.last is not None and offset <= store.last:
                pass  # read before (a consumer may start at the beginning of a chunk)
            elif WINDOW_MARKER in headers:
                markers += 1
                store.commit(offset)  # everything before it is processed: not read again
            else:
                # "Processing": remember it. Then commit: a crash before this line reads
                # the message again after a restart (at least once).
                sender = headers.get(SENDER)
                if isinstance(sender, bytes):
                    sender = sender.decode("utf-8", "replace")
                ids.append(props.message_id)
                senders[sender] = senders.get(sender, 0) + 1
                first = offset if first is None else first
                last = offset
                store.commit(offset)
        if (a.expect and len(ids) >= a.expect) or time.monotonic() >= deadline:
            stopping = True
    try:
        ch.cancel()
        conn.close()
    except pika.exceptions.AMQPError as e:
        # Only if a message came during the cancel: everything processed is committed.
        print("closing: %r" % (e,), file=sys.stderr)
    print(json.dumps({
        "read": len(ids), "ids": ids, "first_offset": first, "last_offset": last,
        "markers_skipped": markers, "senders": senders, "start": start,
        "committed": store.last,
    }))
    return 0 if not a.expect or len(ids) >= a.expect else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--broker", required=True, help="amqp://user:password@host:port/vhost")
    p.add_argument("--identity", help="the node's legal name")
    p.add_argument("--queue", help="peer queue, e.g. drawbridge.peers.bank-b")
    p.add_argument("--queue-type", default="classic", help="x-queue-type of the peer queue")
    p.add_argument("--target", action="append", help="peer float host:port")
    p.add_argument("--legal-name", action="append", help="peer legal name")
    p.add_argument("--destination", help="drawbridge-destination of messages")
    p.add_argument("--inbox", default="drawbridge.inbox", help="the node's inbox queue")
    p.add_argument("--count", type=int, default=10, help="peer messages to send")
    p.add_argument("--run", default="py", help="message ids are <run>-<i:08>")
    p.add_argument("--answer", type=int, default=1, help="snapshot requests to answer")
    p.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds")
    stream = p.add_argument_group("reading a stream inbox instead")
    stream.add_argument("--receive-stream", metavar="QUEUE",
                        help="read this stream inbox (with --offset-file) instead of the above")
    stream.add_argument("--offset-file", help="offset of the last message processed")
    stream.add_argument("--expect", type=int, default=0,
                        help="stop after this many messages (0: read until --timeout)")
    stream.add_argument("--prefetch", type=int, default=100, help="unacked messages at most")
    a = p.parse_args()

    if a.receive_stream:
        if not a.offset_file:
            p.error("--receive-stream needs --offset-file")
        if a.prefetch < 1:
            p.error("--prefetch must be at least 1 (a stream consumer needs credit)")
        return receive_stream(a)
    missing = [
        "--" + name.replace("_", "-")
        for name in ("identity", "queue", "target", "legal_name", "destination")
        if not getattr(a, name)
    ]
    if missing:
        p.error("the following arguments are required: " + ", ".join(missing))

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
