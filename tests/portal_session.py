#!/usr/bin/python3
"""An administrator ends a live session from the portal's dashboard, over real HTTPS.

Run by tests/portal.rs inside the gateway's network namespace, against a real
`pinhole-gateway serve` with a technician connected through a real site. Environment:
PORTAL_URL, ADMIN_PASSWORD (a one-time password from `admin reset`), CA (the gateway's CA
certificate, which signed the portal's certificate), ACCOUNT (whose session to end).

Logs in (password change, TOTP enrollment with a code computed from the secret on the page),
waits until the account's session is on the dashboard, prints "ready", then on a line "go"
from stdin posts the dashboard's "End session" form and prints "ended MS" once the dashboard
no longer lists the session (MS: milliseconds from the post). Exits non-zero on a failure.
Standard library only: the form posts carry the Origin header a browser sends.
"""
import base64, hashlib, hmac, html, http.cookiejar, os, re, ssl, struct, sys, time
import urllib.parse, urllib.request

URL = os.environ["PORTAL_URL"]
ACCOUNT = os.environ["ACCOUNT"]
NEW_PASSWORD = "a long new portal passphrase"


def totp(secret_b32, t):
    key = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))
    mac = hmac.new(key, struct.pack(">Q", int(t) // 30), hashlib.sha1).digest()
    o = mac[-1] & 15
    return "%06d" % ((struct.unpack(">I", mac[o:o + 4])[0] & 0x7FFFFFFF) % 1000000)


# The portal's certificate is the gateway's, issued for its public address: verify the chain
# against the gateway's CA, not the name (the test reaches it on loopback).
ctx = ssl.create_default_context(cafile=os.environ["CA"])
ctx.check_hostname = False


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


jar = http.cookiejar.CookieJar()
follow = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx),
                                     urllib.request.HTTPCookieProcessor(jar))
once = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx),
                                   urllib.request.HTTPCookieProcessor(jar), NoRedirect)


def get(path):
    with follow.open(URL + path, timeout=10) as r:
        return r.geturl(), r.read().decode()


def post(path, fields, opener=follow):
    data = urllib.parse.urlencode(fields).encode()
    req = urllib.request.Request(URL + path, data=data, headers={"Origin": URL})
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, r.geturl(), r.read().decode()
    except urllib.error.HTTPError as e:  # a 303 without following, or a refusal
        return e.code, URL + path, e.read().decode()


def csrf(page, action):
    m = re.search(r'action="%s".*?name="csrf" value="([0-9a-f]+)"' % re.escape(action), page, re.S)
    assert m, "no form for %s in %s" % (action, page[:2000])
    return m.group(1)


def step(text):
    print("step:", text, flush=True)


try:
    step("login")
    _, page = get("/login")
    _, url, page = post("/login", {"csrf": csrf(page, "/login"), "username": "admin",
                                   "password": os.environ["ADMIN_PASSWORD"]})
    assert url.endswith("/login/password"), url
    _, url, page = post("/login/password", {"csrf": csrf(page, "/login/password"),
                                            "new": NEW_PASSWORD, "confirm": NEW_PASSWORD})
    assert url.endswith("/login/enroll"), url
    secret = html.unescape(re.search(r'id="secret"[^>]*>([A-Z2-7]+)<', page).group(1))
    _, url, page = post("/login/enroll", {"csrf": csrf(page, "/login/enroll"),
                                          "code": totp(secret, time.time())})
    assert "recovery-codes" in page, page[:2000]

    step("the session appears on the dashboard")
    deadline = time.time() + 30
    while True:
        _, page = get("/")
        row = re.search(r"<tr>\s*<td>%s</td>.*?</tr>" % re.escape(ACCOUNT), page, re.S)
        if row:
            break
        assert time.time() < deadline, "no session of %s: %s" % (ACCOUNT, page[:3000])
        time.sleep(0.2)
    session = re.search(r'name="session" value="(\d+)"', row.group(0)).group(1)
    token = csrf(page, "/sessions/end")
    print("ready", flush=True)

    assert sys.stdin.readline().strip() == "go"
    start = time.monotonic()
    status, _, _ = post("/sessions/end", {"csrf": token, "session": session}, opener=once)
    assert status == 303, status
    _, page = get("/")
    assert not re.search(r"<td>%s</td>" % re.escape(ACCOUNT), page), "still listed"
    print("ended %d" % ((time.monotonic() - start) * 1000), flush=True)
except Exception as e:
    print("FAILED:", repr(e), file=sys.stderr, flush=True)
    sys.exit(1)
