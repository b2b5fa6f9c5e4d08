#!/usr/bin/env python3
"""The demo's sign-in app: a tiny internal web app that shows who is signed in.

It trusts the identity headers Sallyport's proxy sets (and strips from what clients send)
and shows them, with the signed assertion's claims, decoded but not verified (a real app
verifies it against the fleet's JWKS; see docs/identity.md).

    python3 hack/demo-whoami.py PORT     serves on 127.0.0.1:PORT
"""

import base64
import html
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

IDENTITY_HEADERS = ["X-Remote-User", "X-Remote-Name", "X-Remote-Email", "X-Remote-Groups"]
ASSERTION_HEADER = "X-Sallyport-Assertion"


def assertion_claims(token):
    """The claims of a JWT, decoded without checking its signature (display only)."""
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        return json.dumps(json.loads(base64.urlsafe_b64decode(payload)), indent=2, sort_keys=True)
    except (IndexError, ValueError):
        return "(not a JWT)"


class Handler(BaseHTTPRequestHandler):
    server_version = "sallyport-demo-whoami"

    def do_GET(self):
        user = self.headers.get("X-Remote-User", "")
        name = self.headers.get("X-Remote-Name", "") or user
        rows = "".join(
            f'<tr><th>{html.escape(header)}</th><td id="{header.lower()}">'
            f"{html.escape(self.headers.get(header, '(not set)'))}</td></tr>"
            for header in IDENTITY_HEADERS
        )
        assertion = self.headers.get(ASSERTION_HEADER)
        claims = html.escape(assertion_claims(assertion)) if assertion else "(none)"
        greeting = (
            f'<p id="signed-in">Signed in as <strong>{html.escape(user)}</strong> '
            f"({html.escape(name)}).</p>"
            if user
            else '<p id="signed-in">Nobody is signed in (no X-Remote-User header).</p>'
        )
        body = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>Who am I - Sallyport demo</title></head>
<body>
<h1>Who am I</h1>
{greeting}
<p>An internal app on 127.0.0.1, reached through a Sallyport tunnel. Sallyport signed you
in, checked conditional access, and passed your identity in these headers:</p>
<table>{rows}</table>
<h2>Signed assertion ({html.escape(ASSERTION_HEADER)}), decoded</h2>
<pre id="assertion">{claims}</pre>
<p>Requested path: <code id="path">{html.escape(self.path)}</code></p>
<p><a href="/.sallyport/sign-out">Sign out</a></p>
</body>
</html>
""".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
        sys.stderr.write(
            f"whoami: {self.address_string()} {format % args} user={self.headers.get('X-Remote-User', '-')}\n"
        )


def main():
    if len(sys.argv) != 2:
        sys.stderr.write("usage: demo-whoami.py PORT\n")
        return 2
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    sys.stderr.write(f"whoami: serving on 127.0.0.1:{sys.argv[1]}\n")
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
