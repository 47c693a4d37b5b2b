#!/usr/bin/python3
"""The admin portal's whole story in a real browser against a real system.

Run by tests/portal.rs inside the gateway's network namespace (headless Chromium driven by
chromedriver, Selenium), against a real `pinhole-gateway serve` with two sites online and
a real `pinholed` in a technician's namespace, which the test drives. Environment:
PORTAL_URL, ADMIN_PASSWORD (a one-time password from `admin reset`), DOWNLOADS (directory),
PROFILE (a fresh Chromium user-data-dir), SCREENSHOTS (directory, optional), ACCOUNT (the technician account to create),
DOMAIN (a new domain to create), GRANT (the domain to grant by drag and drop),
HOME_DOMAIN (the account's home domain).

Talks with the test over stdout and stdin, a line each:
  prints "bundle P12 PW"  -> the test imports the bundle into pinholed and logs in; "imported"
  prints "granted"        -> the test connects the technician to a device;          "connected"
  prints "ready"          -> (the session is on the dashboard)                        "go"
  prints "ended MS"       :  the dashboard no longer lists the session, MS after the click
  prints "ok"             :  the account is closed and every step is in the audit page
Other lines start with "step:". Exits non-zero on the first failure.
"""
import base64, hashlib, hmac, os, struct, sys, time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

URL = os.environ["PORTAL_URL"]
PASSWORD = os.environ["ADMIN_PASSWORD"]
DOWNLOADS = os.environ["DOWNLOADS"]
ACCOUNT = os.environ["ACCOUNT"]
DOMAIN = os.environ["DOMAIN"]
GRANT = os.environ["GRANT"]
HOME = os.environ["HOME_DOMAIN"]
SHOTS = os.environ.get("SCREENSHOTS")
NEW_PASSWORD = "a long new portal passphrase"


def totp(secret_b32, t):
    key = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))
    mac = hmac.new(key, struct.pack(">Q", int(t) // 30), hashlib.sha1).digest()
    o = mac[-1] & 15
    return "%06d" % ((struct.unpack(">I", mac[o:o + 4])[0] & 0x7FFFFFFF) % 1000000)


def say(line):
    print(line, flush=True)


def step(text):
    say("step: " + text)


def expect(word):
    got = sys.stdin.readline().strip()
    assert got == word, "the test said %r, not %r" % (got, word)


# HTML5 drag and drop as a person does it, dispatched from script: chromedriver's pointer
# actions do not start a native HTML5 drag, so the events the browser would fire (with one
# DataTransfer carried from dragstart to drop) are fired on the real elements, and the page's
# own handlers (portal.js) do the rest.
DRAG_AND_DROP = """
const [src, dst] = arguments;
const dt = new DataTransfer();
const fire = (el, type) => {
  const r = el.getBoundingClientRect();
  const ev = new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: dt,
                                  clientX: r.left + r.width / 2, clientY: r.top + r.height / 2});
  return el.dispatchEvent(ev);
};
fire(src, "dragstart");
fire(dst, "dragenter");
const accepted = !fire(dst, "dragover");
fire(dst, "drop");
fire(src, "dragend");
return accepted;
"""

opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--no-first-run",
          "--ignore-certificate-errors", "--window-size=1280,900",
          "--user-data-dir=" + os.environ["PROFILE"]]:
    opts.add_argument(a)
opts.add_experimental_option("prefs", {
    "download.default_directory": DOWNLOADS,
    "download.prompt_for_download": False,
})
driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=opts)
driver.set_page_load_timeout(30)
wait = WebDriverWait(driver, 15)


def shot(name):
    if SHOTS:
        driver.save_screenshot(os.path.join(SHOTS, name + ".png"))


def field(id_, value):
    el = driver.find_element(By.ID, id_)
    el.clear()
    el.send_keys(value)
    return el


def session_rows():
    return driver.find_elements(By.XPATH, "//table[@id='sessions']//tr[td[1]='%s']" % ACCOUNT)


try:
    step("first login: password change and TOTP enrollment")
    driver.get(URL + "/")
    assert driver.current_url.endswith("/login"), driver.current_url
    field("username", "admin")
    field("password", PASSWORD).submit()
    wait.until(lambda d: d.current_url.endswith("/login/password"))
    field("new", NEW_PASSWORD)
    field("confirm", NEW_PASSWORD).submit()
    wait.until(lambda d: d.current_url.endswith("/login/enroll"))
    assert driver.find_elements(By.CSS_SELECTOR, ".qr svg"), "QR code"
    secret = driver.find_element(By.ID, "secret").text.strip()
    field("code", totp(secret, time.time())).submit()
    wait.until(lambda d: d.find_elements(By.ID, "recovery-codes"))
    driver.find_element(By.LINK_TEXT, "I have stored them: go to the portal").click()
    wait.until(lambda d: d.find_elements(By.ID, "sessions-h"))

    step("create a domain")
    driver.get(URL + "/domains")
    field("domain", DOMAIN).submit()
    wait.until(lambda d: DOMAIN in d.find_element(By.ID, "domain-tree").text)

    step("create an account and download its bundle")
    driver.get(URL + "/accounts")
    field("name", ACCOUNT)
    Select(driver.find_element(By.ID, "domain")).select_by_visible_text(HOME)
    driver.find_element(By.XPATH, "//button[text()='Create account']").click()
    wait.until(lambda d: d.find_elements(By.ID, "bundle-password"))
    bundle_password = driver.find_element(By.ID, "bundle-password").text.strip()
    pw = os.path.join(DOWNLOADS, ACCOUNT + ".pw")
    with open(pw, "w") as f:
        f.write(bundle_password + "\n")
    driver.find_element(By.ID, "download").click()
    p12 = os.path.join(DOWNLOADS, ACCOUNT + ".p12")
    for _ in range(100):
        if os.path.exists(p12) and os.path.getsize(p12) > 0 and \
                not any(n.endswith(".crdownload") for n in os.listdir(DOWNLOADS)):
            break
        time.sleep(0.1)
    assert os.path.exists(p12), os.listdir(DOWNLOADS)

    step("the technician imports the bundle into pinholed and logs in")
    say("bundle %s %s" % (p12, pw))
    expect("imported")

    step("grant the account by dragging it onto the domain")
    driver.get(URL + "/access")
    chip = driver.find_element(By.CSS_SELECTOR, "#matrix [data-account='%s']" % ACCOUNT)
    column = driver.find_element(By.CSS_SELECTOR, "#matrix th[data-drop-account='%s']" % GRANT)
    assert driver.execute_script(DRAG_AND_DROP, chip, column), "the column refused the drop"
    # The drop fills the grant form and submits it: the server says what the grant opens
    # before anything is saved.
    wait.until(lambda d: "This gives %s" % ACCOUNT in d.page_source)
    preview = driver.find_element(By.TAG_NAME, "main").text
    step("preview: " + " ".join(preview.split()))
    driver.find_element(By.XPATH, "//button[text()='Grant %s to %s']" % (GRANT, ACCOUNT)).click()
    wait.until(lambda d: d.current_url.endswith("/access"))

    step("the grant is in the access matrix, inherited below the domain")
    row = driver.find_element(By.XPATH, "//table[@id='matrix']//tr[th//text()='%s']" % ACCOUNT)
    cell = row.find_element(By.CSS_SELECTOR, "td[data-domain='%s']" % GRANT)
    assert "granted" in cell.text and "granted" in cell.get_attribute("class"), cell.text
    assert "inherited from %s" % GRANT in row.text, row.text
    site_row = driver.find_element(
        By.XPATH, "//table[@id='site-matrix']//tr[th[text()='%s']]" % ACCOUNT)
    assert "inherited from %s" % GRANT in site_row.text, site_row.text
    shot("access-matrix")
    say("granted")
    expect("connected")

    step("the technician's live session appears on the dashboard")
    deadline = time.time() + 30
    while not session_rows():
        assert time.time() < deadline, "no session of %s on the dashboard" % ACCOUNT
        time.sleep(0.3)
        driver.get(URL + "/")
    # The sites page meanwhile: the switch on, the light lit by the session.
    driver.get(URL + "/sites")
    light = driver.find_element(By.XPATH, "//table[@id='sites']//tr[td[1]='plant-a']")
    assert "on (1 session)" in light.text, light.text
    shot("sites")
    driver.get(URL + "/")
    wait.until(lambda d: session_rows())
    shot("dashboard-session")
    say("ready")
    expect("go")

    step("end it from the dashboard")
    start = time.monotonic()
    session_rows()[0].find_element(By.XPATH, ".//button[text()='End session']").click()
    wait.until(lambda d: d.find_elements(By.ID, "sessions-h") and not session_rows())
    say("ended %d" % ((time.monotonic() - start) * 1000))

    step("close the account")
    driver.get(URL + "/accounts")
    driver.find_element(By.XPATH, "//button[text()='Close %s']" % ACCOUNT).click()
    alert = wait.until(lambda d: d.switch_to.alert)
    assert ACCOUNT in alert.text, alert.text
    alert.accept()
    wait.until(lambda d: "closed" in
               d.find_element(By.XPATH, "//table[@id='accounts']//tr[td[1]='%s']" % ACCOUNT).text)

    step("each step is in the audit page")
    driver.get(URL + "/audit")
    log = driver.find_element(By.ID, "audit").text
    for e in ["admin password changed", "admin TOTP enrolled", "domain created",
              "account created", "account bundle downloaded", "login ok", "grant changed",
              "session opened", "session ended by admin", "account closed"]:
        assert e in log, "%s not in the audit page:\n%s" % (e, log)
    assert "intact" in driver.find_element(By.ID, "chain").text
    say("ok")
except Exception as e:  # report the page for diagnosis
    print("FAILED:", repr(e), "at", driver.current_url, file=sys.stderr)
    print(driver.page_source[:4000], file=sys.stderr)
    sys.exit(1)
finally:
    driver.quit()
