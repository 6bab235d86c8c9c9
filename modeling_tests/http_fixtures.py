"""Loopback HTTP servers for the serving tests: a scripted OpenAI-style server on the standard library's threaded
HTTP server (`serve`), misbehaving answers (trickling, stalling), and any ASGI app on uvicorn (`serve_app`). All
bind 127.0.0.1 on a free port and stop on exit; every loop in them is bounded in time."""

import json
import select
import socket
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class OpenAIHandler(BaseHTTPRequestHandler):
    """Routes POST /v1/completions and GET /v1/models to the server's `respond(path, body)`, which returns
    `(status, payload, headers)`, None to drop the connection without answering, or a callable that writes the
    answer itself (`behaviour(handler)`: trickling, stalling)."""

    def do_GET(self):
        self._answer(self.server.respond(self.path, None))

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._answer(self.server.respond(self.path, body))

    def _answer(self, reply):
        if reply is None:
            self.close_connection = True
            return
        if callable(reply):
            reply(self)
            self.close_connection = True
            return
        status, payload, headers = reply
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class LoopbackServer(ThreadingHTTPServer):
    """Clients that leave before their answer is written (timeouts, cancelled requests) are what these tests make
    happen: the standard library would print that handler's BrokenPipe traceback to stderr, possibly while a later
    test is capturing it."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@contextmanager
def serve(respond):
    """A threaded HTTP server on a free loopback port; yields its base URL, stops on exit."""
    server = LoopbackServer(("127.0.0.1", 0), OpenAIHandler)
    server.respond = respond
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def scripted_completion(body) -> dict:
    return {"choices": [{"text": f"<think> w </think> \\boxed{{{len(body['prompt'])}}}", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 5}}


def client_left(handler, seconds: float) -> bool:
    """Wait up to `seconds` for the client to close its connection; whether it did."""
    connection = handler.connection
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        readable, _, _ = select.select([connection], [], [], 0.05)
        if readable and connection.recv(1, socket.MSG_PEEK) == b"":
            return True
    return False


class Misbehaving:
    """Answers every completion request by trickling (one byte per `interval` of a long body, for at most 10 s) or
    by stalling (headers never sent; waits at most 10 s for the client to leave), counting requests and clients
    that left."""

    def __init__(self, mode: str, interval: float = 0.25):
        self.mode, self.interval = mode, interval
        self.requests = self.left = 0
        self.lock = threading.Lock()

    def __call__(self, path, body):
        with self.lock:
            self.requests += 1
        return self.trickle if self.mode == "trickle" else self.stall

    def trickle(self, handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        try:
            for _ in range(int(10 / self.interval)):
                handler.wfile.write(b" ")
                handler.wfile.flush()
                time.sleep(self.interval)
        except OSError:  # the client closed the connection
            with self.lock:
                self.left += 1

    def stall(self, handler):
        if client_left(handler, 10.0):
            with self.lock:
                self.left += 1


@contextmanager
def serve_app(app):
    """An ASGI app on uvicorn in a thread, on a free loopback port; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 30
        while not server.started and thread.is_alive() and time.monotonic() < end:
            time.sleep(0.02)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
