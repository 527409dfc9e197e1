"""A small HTTP app that the services tests run as a replica (standard library only).

    python3 service_app.py PORT

Routes: any path answers JSON about the request (path, method, replica, pid, whether an
Authorization header arrived); `/sse` streams three server-sent events; `/ws` is a WebSocket
echo; `/slow?s=N` answers after N seconds; `/crash` closes the connection without an answer;
`/echo` (POST) answers the body; `/v1/chat/completions` is a fake OpenAI chat endpoint
(streamed with `"stream": true`). With `FAIL_ROOT=1` in the environment, `/` answers 500.
"""

import base64
import hashlib
import json
import os
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("app: %s %s\n" % (self.command, self.path))

    def answer(self, status, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def about(self):
        return {
            "path": self.path,
            "method": self.command,
            "replica": os.environ.get("DSTACK_REPLICA_NUM"),
            "pid": os.getpid(),
            "version": os.environ.get("VERSION"),
            "authorization": self.headers.get("Authorization") is not None,
        }

    def body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/" and os.environ.get("FAIL_ROOT") == "1":
            return self.answer(500, {"error": "failing on purpose"})
        if url.path.endswith("/sse"):
            return self.sse()
        if url.path.endswith("/ws"):
            return self.websocket()
        if url.path.endswith("/slow"):
            time.sleep(float(parse_qs(url.query).get("s", ["1"])[0]))
        if url.path.endswith("/crash"):
            self.close_connection = True
            self.connection.close()
            return
        self.answer(200, self.about())

    def do_POST(self):
        url = urlparse(self.path)
        body = self.body()
        if url.path.endswith("/chat/completions"):
            return self.chat(json.loads(body or b"{}"))
        if url.path.endswith("/echo"):
            return self.answer(200, body, "application/octet-stream")
        self.answer(200, self.about())

    do_PUT = do_POST
    do_DELETE = do_GET

    def sse(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(3):
            chunk = ("data: event %d\n\n" % i).encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
            time.sleep(0.3)
        self.wfile.write(b"0\r\n\r\n")

    def chat(self, request):
        reply = "hello from %s" % request.get("model")
        if request.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for word in reply.split(" ") + [None]:
                if word is None:
                    line = "data: [DONE]\n\n"
                else:
                    delta = {"choices": [{"index": 0, "delta": {"content": word}}]}
                    line = "data: %s\n\n" % json.dumps(delta)
                chunk = line.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            return
        self.answer(200, {
            "object": "chat.completion",
            "model": request.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}],
        })

    def websocket(self):
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                break
            opcode = head[0] & 0x0F
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", self.rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if opcode == 8:
                self.wfile.write(b"\x88\x00")
                break
            self.wfile.write(bytes([0x80 | opcode, len(data)]) + data)
            self.wfile.flush()
        self.close_connection = True


if __name__ == "__main__":
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
