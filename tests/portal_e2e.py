#!/usr/bin/python3
"""The admin portal in a real browser: headless Chromium driven by chromedriver (Selenium).

Run by tests/portal.rs against a real `pinhole-gateway serve`. Environment:
PORTAL_URL, ADMIN_PASSWORD (the one-time password from `init`), DOWNLOADS (directory),
SCREENSHOTS (directory, optional), PROFILE (a fresh Chromium user-data-dir).
Prints one line per step; exits non-zero on the first failure.
"""
import base64, hashlib, hmac, os, re, struct, sys, time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

URL = os.environ["PORTAL_URL"]
PASSWORD = os.environ["ADMIN_PASSWORD"]
DOWNLOADS = os.environ["DOWNLOADS"]
SHOTS = os.environ.get("SCREENSHOTS")
NEW_PASSWORD = "a long new portal passphrase"


def totp(secret_b32, t):
    key = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))
    mac = hmac.new(key, struct.pack(">Q", int(t) // 30), hashlib.sha1).digest()
    o = mac[-1] & 15
    return "%06d" % ((struct.unpack(">I", mac[o:o + 4])[0] & 0x7FFFFFFF) % 1000000)


def step(text):
    print("step:", text, flush=True)


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


def h1():
    return driver.find_element(By.TAG_NAME, "h2" if "bare" in driver.find_element(By.TAG_NAME, "body").get_attribute("class") else "h1").text


try:
    step("login page")
    driver.get(URL + "/")
    assert driver.current_url.endswith("/login"), driver.current_url
    shot("login")
    field("username", "admin")
    field("password", PASSWORD).submit()

    step("first login: new password")
    wait.until(lambda d: d.current_url.endswith("/login/password"))
    field("new", NEW_PASSWORD)
    field("confirm", NEW_PASSWORD).submit()

    step("TOTP enrollment")
    wait.until(lambda d: d.current_url.endswith("/login/enroll"))
    assert driver.find_elements(By.CSS_SELECTOR, ".qr svg"), "QR code"
    secret = driver.find_element(By.ID, "secret").text.strip()
    shot("enroll")
    field("code", totp(secret, time.time())).submit()
    wait.until(lambda d: d.find_elements(By.ID, "recovery-codes"))
    codes = driver.find_elements(By.CSS_SELECTOR, "#recovery-codes code")
    assert len(codes) == 10, len(codes)
    enrolled_step = int(time.time()) // 30
    driver.find_element(By.LINK_TEXT, "I have stored them: go to the portal").click()
    wait.until(lambda d: d.find_elements(By.ID, "sessions-h"))

    step("log out and in again with the next TOTP code")
    driver.find_element(By.XPATH, "//button[text()='Log out']").click()
    wait.until(lambda d: d.current_url.endswith("/login"))
    field("username", "admin")
    field("password", NEW_PASSWORD).submit()
    wait.until(lambda d: d.current_url.endswith("/login/totp"))
    # Each code works once: wait for a step after the enrollment's.
    while int(time.time()) // 30 <= enrolled_step:
        time.sleep(1)
    field("code", totp(secret, time.time())).submit()
    wait.until(lambda d: d.find_elements(By.ID, "sessions-h"))
    shot("dashboard")

    step("create a domain")
    driver.get(URL + "/domains")
    field("domain", "acme.plant-a").submit()
    wait.until(lambda d: "acme.plant-a" in d.find_element(By.ID, "domain-tree").text)
    shot("domains")

    step("create an account and download its bundle once")
    driver.get(URL + "/accounts")
    field("name", "tech1")
    Select(driver.find_element(By.ID, "domain")).select_by_visible_text("acme")
    driver.find_element(By.XPATH, "//button[text()='Create account']").click()
    wait.until(lambda d: d.find_elements(By.ID, "bundle-password"))
    bundle_password = driver.find_element(By.ID, "bundle-password").text.strip()
    assert len(bundle_password) >= 16, bundle_password
    with open(os.path.join(DOWNLOADS, "tech1.pw"), "w") as f:
        f.write(bundle_password + "\n")
    driver.find_element(By.ID, "download").click()
    target = os.path.join(DOWNLOADS, "tech1.p12")
    for _ in range(100):
        if os.path.exists(target) and os.path.getsize(target) > 0:
            break
        time.sleep(0.1)
    assert os.path.exists(target), os.listdir(DOWNLOADS)

    step("grant the account a domain (form), with the preview")
    driver.get(URL + "/access")
    shot("access")
    Select(driver.find_element(By.ID, "grant-account")).select_by_visible_text("tech1")
    Select(driver.find_element(By.ID, "grant-domain")).select_by_visible_text("acme")
    driver.find_element(By.XPATH, "//button[text()='Review the grant']").click()
    wait.until(lambda d: "This gives tech1" in d.page_source)
    driver.find_element(By.XPATH, "//button[text()='Grant acme to tech1']").click()
    wait.until(lambda d: d.current_url.endswith("/access"))
    cell = driver.find_element(By.CSS_SELECTOR, "#matrix td.granted")
    assert "granted" in cell.text, cell.text
    assert "inherited from acme" in driver.find_element(By.ID, "matrix").text

    step("the certificate's expiry is shown")
    driver.get(URL + "/accounts")
    row = driver.find_element(By.XPATH, "//table[@id='accounts']//tr[td[1]='tech1']")

    assert re.search(r"\d{4}-\d{2}-\d{2}", row.find_elements(By.TAG_NAME, "td")[5].text), row.text

    step("re-issue the bundle: confirmation, password shown once, download once")
    driver.find_element(By.XPATH, "//button[text()='Re-issue bundle of tech1']").click()
    alert = wait.until(lambda d: d.switch_to.alert)
    assert "tech1" in alert.text, alert.text
    alert.accept()
    wait.until(lambda d: d.find_elements(By.ID, "bundle-password"))
    assert "Bundle of tech1 re-issued" in driver.find_element(By.TAG_NAME, "h1").text
    reissued_password = driver.find_element(By.ID, "bundle-password").text.strip()
    assert reissued_password != bundle_password
    with open(os.path.join(DOWNLOADS, "tech1-2.pw"), "w") as f:
        f.write(reissued_password + "\n")
    before = set(os.listdir(DOWNLOADS))
    driver.find_element(By.ID, "download").click()
    for _ in range(100):
        new = [n for n in set(os.listdir(DOWNLOADS)) - before if n.endswith(".p12")]
        if new and os.path.getsize(os.path.join(DOWNLOADS, new[0])) > 0:
            break
        time.sleep(0.1)
    assert new, os.listdir(DOWNLOADS)
    os.rename(os.path.join(DOWNLOADS, new[0]), os.path.join(DOWNLOADS, "tech1-2.p12"))

    step("rename a domain, then delete it while it is empty")
    driver.get(URL + "/domains")
    field("domain", "acme.scratch").submit()
    wait.until(lambda d: "acme.scratch" in d.find_element(By.ID, "domain-tree").text)
    field("rename-acme.scratch", "scratch-2").submit()
    wait.until(lambda d: "acme.scratch-2" in d.find_element(By.ID, "domain-tree").text)
    driver.find_element(By.XPATH, "//button[@aria-label='Delete domain acme.scratch-2']").click()
    alert = wait.until(lambda d: d.switch_to.alert)
    assert "acme.scratch-2" in alert.text, alert.text
    alert.accept()
    wait.until(lambda d: "scratch" not in d.find_element(By.ID, "domain-tree").text)

    step("close the account in one click, with a confirmation naming it")
    driver.get(URL + "/accounts")
    driver.find_element(By.XPATH, "//button[text()='Close tech1']").click()
    alert = wait.until(lambda d: d.switch_to.alert)
    assert "tech1" in alert.text, alert.text
    alert.accept()
    wait.until(lambda d: "closed" in d.find_element(By.ID, "accounts").text)
    shot("accounts")

    step("each step is in the audit log")
    driver.get(URL + "/audit")
    log = driver.find_element(By.ID, "audit").text
    for e in ["admin TOTP enrolled", "admin login", "domain created", "account created",
              "account bundle downloaded", "grant changed", "account bundle re-issued",
              "domain renamed", "domain deleted", "account closed"]:
        assert e in log, e
    assert "intact" in driver.find_element(By.ID, "chain").text
    shot("audit")
    print("ok", flush=True)
except Exception as e:  # report the page for diagnosis
    print("FAILED:", repr(e), "at", driver.current_url, file=sys.stderr)
    print(driver.page_source[:3000], file=sys.stderr)
    sys.exit(1)
finally:
    driver.quit()
