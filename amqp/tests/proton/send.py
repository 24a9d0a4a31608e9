#!/usr/bin/python3
"""A Qpid Proton client that sends <count> messages of <size> bytes (a Data body) to
127.0.0.1:<port>, address 'inbox', SASL ANONYMOUS; prints 'ACCEPTED <n>' per accepted
message and 'DONE' when all are settled. Usage: send.py <port> <count> <size>"""
import sys
from proton import Message
from proton.handlers import MessagingHandler
from proton.reactor import Container


class Sender(MessagingHandler):
    def __init__(self, url, count, size):
        super().__init__()
        self.url, self.count, self.size = url, count, size
        self.sent = self.settled = 0

    def on_start(self, event):
        conn = event.container.connect(self.url, allowed_mechs="ANONYMOUS", idle_timeout=10)
        event.container.create_sender(conn, "inbox")

    def on_sendable(self, event):
        while event.sender.credit and self.sent < self.count:
            body = bytes([self.sent % 256]) * self.size
            event.sender.send(Message(id=self.sent, body=body, inferred=True))
            self.sent += 1

    def on_accepted(self, event):
        print("ACCEPTED", event.delivery.tag, flush=True)
        self._settled(event)

    def on_rejected(self, event):
        print("REJECTED", event.delivery.tag, flush=True)
        self._settled(event)

    def on_released(self, event):
        print("RELEASED", event.delivery.tag, flush=True)
        self._settled(event)

    def _settled(self, event):
        self.settled += 1
        if self.settled == self.count:
            print("DONE", flush=True)
            event.connection.close()


if __name__ == "__main__":
    port, count, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    Container(Sender("amqp://127.0.0.1:%d" % port, count, size)).run()
