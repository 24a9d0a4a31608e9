#!/usr/bin/python3
"""A Qpid Proton server that receives: listens on 127.0.0.1:<port> (printed as 'PORT <n>'), accepts
every message (rejects a body that starts with b'reject'), prints 'GOT <len>' per message, and
exits after <count> messages once the client closes. SASL off on both ends (plain TCP).
Usage: receive.py <count> <credit>"""
import sys
from proton.handlers import MessagingHandler
from proton.reactor import Container


class Receiver(MessagingHandler):
    def __init__(self, count, credit):
        super().__init__(prefetch=credit, auto_accept=False)
        self.count = count
        self.got = 0

    def on_start(self, event):
        self.acceptor = event.container.listen("127.0.0.1:0")
        # Proton 0.37 has no port getter on the acceptor: the script's caller picks the port.

    def on_message(self, event):
        body = event.message.body
        data = bytes(body) if body is not None else b""
        if data.startswith(b"reject"):
            self.reject(event.delivery)
        else:
            self.accept(event.delivery)
        self.got += 1
        print("GOT", len(data), flush=True)

    def on_connection_closed(self, event):
        if self.got >= self.count:
            self.acceptor.close()


class FixedPort(Receiver):
    def __init__(self, count, credit, port):
        super().__init__(count, credit)
        self.port = port

    def on_start(self, event):
        self.acceptor = event.container.listen("127.0.0.1:%d" % self.port)
        print("LISTENING", flush=True)


if __name__ == "__main__":
    count, credit, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    c = Container(FixedPort(count, credit, port))
    c.sasl_enabled = False
    c.run()
