"""A real SMTP submission server for tests/smtp.rs (aiosmtpd, pinned in requirements.txt).

    smtpd.py --cert CERT --key KEY [--implicit] [--user U --password P]

Listens on 127.0.0.1, port 0, and prints one JSON line per event on stdout:
  {"event": "ready", "port": N}
  {"event": "auth", "user": "...", "ok": true|false}       (the password is never printed)
  {"event": "mail", "code": 250|4xx|5xx, "from": ..., "to": [...], "subject": ...,
   "body": ..., "message_id": ..., "headers": {...}, "tls": bool, "user": ...}
  {"event": "control", "queued": N}                          (after each stdin line)

STARTTLS is offered and required before anything else (--implicit: TLS from the first
byte instead; --plain: no TLS at all, AUTH offered in the clear, to show that the client
refuses), AUTH is required (when --user is given) and only offered over TLS.

Each stdin line "reply <code> <text>" queues an answer for the next e-mail's DATA instead of
250 (e.g. "reply 451 4.3.0 try later", "reply 554 5.6.0 refused"); the answer is printed as the
mail event's "code" either way.
"""

import argparse
import asyncio
import email
import email.policy
import json
import queue
import ssl
import sys
import threading

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

OUT = threading.Lock()


def emit(obj):
    with OUT:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


REPLIES = queue.Queue()
IMPLICIT = False


def control():
    for line in sys.stdin:
        parts = line.strip().split(" ", 2)
        if len(parts) >= 2 and parts[0] == "reply":
            REPLIES.put(parts[1] + (" " + parts[2] if len(parts) > 2 else ""))
        emit({"event": "control", "queued": REPLIES.qsize()})


class Handler:
    async def handle_DATA(self, server, session, envelope):
        try:
            answer = REPLIES.get_nowait()
        except queue.Empty:
            answer = "250 2.0.0 OK"
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        body = msg.get_body(preferencelist=("plain",))
        emit(
            {
                "event": "mail",
                "code": int(answer[:3]),
                "from": envelope.mail_from,
                "to": list(envelope.rcpt_tos),
                "subject": str(msg["subject"] or ""),
                "body": body.get_content().replace("\r\n", "\n") if body is not None else "",
                "message_id": str(msg["message-id"] or ""),
                "headers": {k.lower(): str(v) for k, v in msg.items()},
                "tls": IMPLICIT or session.ssl is not None,
                "user": session.auth_data.login.decode() if session.authenticated and isinstance(session.auth_data, LoginPassword) else None,
            }
        )
        return answer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--implicit", action="store_true")
    ap.add_argument("--plain", action="store_true", help="no TLS at all (no STARTTLS offered)")
    ap.add_argument("--user")
    ap.add_argument("--password")
    a = ap.parse_args()
    global IMPLICIT
    IMPLICIT = a.implicit

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(a.cert, a.key)

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == a.user
            and auth_data.password.decode() == a.password
        )
        emit({"event": "auth", "user": auth_data.login.decode(), "ok": ok})
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    def factory():
        kw = dict(hostname="smtp.test", ident="lorastream test SMTP")
        if a.user:
            # With implicit TLS aiosmtpd does not know the socket is TLS: it is, from the start.
            kw.update(
                authenticator=authenticator,
                auth_required=True,
                auth_require_tls=not (a.implicit or a.plain),
            )
        else:
            kw.update(auth_require_tls=False)
        if not (a.implicit or a.plain):
            kw.update(tls_context=ctx, require_starttls=True)
        return SMTP(Handler(), **kw)

    async def serve():
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(
            factory, "127.0.0.1", 0, ssl=ctx if a.implicit else None
        )
        emit({"event": "ready", "port": srv.sockets[0].getsockname()[1]})
        await srv.serve_forever()

    threading.Thread(target=control, daemon=True).start()
    asyncio.run(serve())


if __name__ == "__main__":
    main()
