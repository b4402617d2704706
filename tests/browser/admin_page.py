#!/usr/bin/python3
"""Drives the admin page in headless Chromium (Selenium, the system chromedriver).

Run by tests/integration/admin_page.rs, which starts the host; by hand for the screenshot in
docs/ (see --docs). The token comes in the ADMIN_TOKEN environment variable, never on the
command line.

Test mode (the default), each step checked, with no console error (SEVERE) in the browser log:
  1. open URL#token=TOKEN: the fragment leaves the address bar, the token is in
     sessionStorage, and the workers the test expects (--expect-pids) are shown (and, with
     --expect-traffic, the chart's current requests per second), and no "Kept, not running"
     section (the host keeps no service it does not run);
  2. click the service's Reload button, accept the confirm(), see the progress lines and the
     outcome stream in, then see new ready pids in place of the old ones; with --rollback, the
     same with its Roll back button, after which the version left is shown as "set aside";
  3. reload the page: the token is still in sessionStorage, the workers show again;
  4. "Forget token", a wrong token in the form (refused, the form asks again; the one 401 in
     the browser log is expected), then the right one: the workers show again;
  5. a screenshot to --screenshot.
The last line on stdout is JSON: {"shown": [...], "after_reload": [...], "after_rollback": [...]}.

Not-running mode (--expect-not-running NAME=VERSION, repeated): sign in as in step 1, then
wait until the "Kept, not running" section lists exactly those services, each with the version
that was live when it last ran, and that no service card is shown for them; a screenshot. The
last line is JSON: {"shown": [...], "not_running": [[name, version], ...]}.

Docs mode (--docs): sign in, wait until the chart holds --min-points samples (run some load
meanwhile), reload --service from the page, wait a little more traffic, take the screenshot.

Exit status: 0 on success, 1 when a check fails, 2 when Chromium, chromedriver or Selenium is
missing.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MISSING = (
    "the admin page test needs Chromium, its WebDriver and Selenium for the system Python: "
    "apt-get install chromium chromium-driver python3-selenium"
)

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as e:
    print(f"{MISSING} ({e})", file=sys.stderr)
    sys.exit(2)

WAIT_S = 20


class Failed(Exception):
    pass


def log(message):
    print(f"admin_page.py: {message}", file=sys.stderr, flush=True)


def start_browser(profile):
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            print(f"{MISSING} (no {path})", file=sys.stderr)
            sys.exit(2)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--password-store=basic",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The system chromedriver, named explicitly: Selenium never looks for (or downloads) one.
    service = Service(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=options)
    # The page itself 1280x900 (--window-size counts the window, not the page).
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
    )
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    return driver


class Page:
    def __init__(self, driver, url, service):
        self.driver = driver
        self.url = url
        self.service = service

    def wait(self, what, condition, timeout=WAIT_S):
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(condition)
        except TimeoutException:
            raise Failed(f"timed out after {timeout} s waiting until {what}\n{self.describe()}")

    def describe(self):
        """What the page shows, for a failure message."""
        try:
            return "--- page text ---\n" + self.driver.find_element(By.TAG_NAME, "body").text
        except Exception as e:  # the page may be gone
            return f"(page text unavailable: {e})"

    def card(self):
        return f'section.service[data-service="{self.service}"]'

    def ready_pids(self):
        # Read in one script: the page rebuilds the workers table on every poll, so elements
        # found one call earlier may be gone.
        pids = self.driver.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0]), r => r.dataset.pid);",
            f'{self.card()} tr[data-state="ready"]',
        )
        return sorted(int(p) for p in pids)

    def wait_for_pids(self, what, accept):
        """Waits until the ready pids shown satisfy `accept`; returns them."""
        found = []

        def check(_):
            pids = self.ready_pids()
            if pids and accept(pids):
                found[:] = pids
                return True
            return False

        self.wait(what, check)
        return found

    def visible(self, element_id):
        return self.driver.find_element(By.ID, element_id).is_displayed()

    def check_console(self, step, allowed=()):
        """Fails on any SEVERE browser log entry except those containing an `allowed` text."""
        errors = []
        for entry in self.driver.get_log("browser"):
            message = entry.get("message", "")
            if entry.get("level") == "SEVERE":
                if any(a in message for a in allowed):
                    log(f"{step}: expected console error: {message}")
                else:
                    errors.append(message)
            elif entry.get("level") == "WARNING":
                log(f"{step}: console warning: {message}")
        if errors:
            raise Failed(f"{step}: console errors:\n  " + "\n  ".join(errors))

    def session_token(self):
        return self.driver.execute_script("return sessionStorage.getItem('host-admin-token');")


def sign_in_by_fragment(page, token, expect, traffic=False):
    page.driver.get(page.url + "#token=" + token)
    shown = page.wait_for_pids(
        f"the page shows the workers {expect}", lambda pids: set(expect) <= set(pids)
    )
    if traffic:
        now = page.driver.find_element(By.CSS_SELECTOR, f"{page.card()} .chart-now")
        page.wait("the chart shows the traffic", lambda _: "req/s" in now.text)
    current = page.driver.current_url
    if "token" in current:
        raise Failed(f"the token is still in the address bar: {current}")
    if page.session_token() != token:
        raise Failed("the token is not in sessionStorage")
    if page.visible("login"):
        raise Failed("the token form is shown although the fragment held the token")
    page.check_console("sign in by fragment")
    log(f"signed in by the URL fragment; workers shown: {shown}")
    return shown


def operate_from_page(page, before, kind):
    """Clicks the service's `kind` button ("reload" or "rollback"), accepts the confirm(),
    checks the progress and outcome shown, and waits for new ready workers; returns them."""
    button = page.driver.find_element(By.CSS_SELECTOR, f"{page.card()} button.{kind}")
    page.wait(f"the {kind} button is enabled", lambda _: button.is_enabled())
    button.click()
    alert = page.wait("the confirm dialog opens", EC.alert_is_present())
    if page.service not in alert.text:
        raise Failed(f"the confirm dialog does not name the service: {alert.text!r}")
    alert.accept()
    state = page.driver.find_element(By.ID, "op-state")
    page.wait(
        f"the {kind}'s outcome is shown",
        lambda _: "running" not in state.text and state.text.strip() != "",
    )
    op_log = page.driver.find_element(By.ID, "op-log").text
    if not state.text.startswith("done"):
        raise Failed(f"the {kind} failed: {state.text}\n{op_log}")
    if f"{kind} done" not in op_log or page.service + ": worker" not in op_log:
        raise Failed(f"the progress lines are not shown:\n{op_log}")
    after = page.wait_for_pids(
        f"new ready workers replace {before}",
        lambda pids: len(pids) == len(before) and not set(pids) & set(before),
    )
    events = page.driver.find_element(By.CSS_SELECTOR, f"{page.card()} table.events")
    page.wait(
        f"the {kind} is in the last reloads and rollbacks",
        lambda _: kind in events.text and "done" in events.text,
    )
    page.check_console(f"{kind} from the page")
    log(f"{kind} from the page; workers now: {after}")
    return after


def reload_from_page(page, before):
    return operate_from_page(page, before, "reload")


def rollback_from_page(page, before):
    """Rolls back from the page; the version left is then shown as set aside."""
    after = operate_from_page(page, before, "rollback")
    versions = page.driver.find_element(By.CSS_SELECTOR, f"{page.card()} table.versions")
    page.wait("the version rolled back from is shown as set aside", lambda _: "set aside" in versions.text)
    return after


def survive_page_reload(page, expect):
    page.driver.refresh()
    page.wait_for_pids("the workers show again after a page reload", lambda p: p == expect)
    if page.visible("login"):
        raise Failed("the token form is shown although sessionStorage holds the token")
    page.check_console("page reload")


def sign_in_by_form(page, token, expect):
    page.driver.find_element(By.ID, "forget").click()
    page.wait("the token form is shown", lambda _: page.visible("login"))
    if page.session_token() is not None:
        raise Failed("Forget token left the token in sessionStorage")
    if page.visible("dash"):
        raise Failed("the dashboard is still shown without a token")

    field = page.driver.find_element(By.ID, "token")
    field.send_keys("not-the-token-" + "x" * 20)
    page.driver.find_element(By.ID, "login-submit").click()
    message = page.driver.find_element(By.ID, "login-msg")
    page.wait("a wrong token is refused", lambda _: "refused" in message.text)
    if page.session_token() is not None:
        raise Failed("a refused token was kept in sessionStorage")
    # The one 401 the wrong token earned is the only console error allowed here.
    page.check_console("a wrong token", allowed=("401",))

    field = page.driver.find_element(By.ID, "token")
    field.send_keys(token)
    page.driver.find_element(By.ID, "login-submit").click()
    page.wait_for_pids("the form's token shows the workers", lambda p: p == expect)
    if page.session_token() != token:
        raise Failed("the form's token is not in sessionStorage")
    page.check_console("sign in by the form")
    log("signed in by the form")


def check_not_running(page, expect):
    """Waits until the page lists exactly `expect` ({name: version}) as kept but not running;
    returns what it lists, as [name, version] pairs."""
    listed = []

    def check(_):
        rows = page.driver.execute_script(
            """
            const section = document.getElementById('dormant');
            if (section.hidden) return null;
            return Array.from(section.querySelectorAll('tbody tr'),
              r => [r.dataset.service, r.cells[2].textContent]);
            """
        )
        if rows is None or sorted(map(tuple, rows)) != sorted(expect.items()):
            return False
        listed[:] = rows
        return True

    page.wait(f"the page lists {expect} as kept but not running", check)
    for name in expect:
        cards = page.driver.find_elements(By.CSS_SELECTOR, f'section.service[data-service="{name}"]')
        if cards:
            raise Failed(f"{name} is listed as not running but has a service card")
    page.check_console("not running")
    log(f"kept but not running: {listed}")
    return listed


def series_points(page):
    """The fewest samples any service has in /api/series, fetched by the page's own token."""
    return page.driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch('/api/series', {headers: {Authorization:
            'Bearer ' + sessionStorage.getItem('host-admin-token')}})
          .then(r => r.json())
          .then(s => done(Math.min(...Object.values(s.services).map(p => p.length), 1e9)))
          .catch(() => done(0));
        """
    )


def docs(page, token, args):
    shown = sign_in_by_fragment(page, token, [])
    page.wait(
        f"the chart holds {args.min_points} samples",
        lambda _: series_points(page) >= args.min_points,
        timeout=args.min_points + 60,
    )
    reload_from_page(page, shown)
    target = series_points(page) + 15
    page.wait("traffic after the reload", lambda _: series_points(page) >= min(target, 300))
    page.check_console("docs")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="the admin listener, http://ADDR/")
    parser.add_argument("--service", required=True, help="the service to reload")
    parser.add_argument("--expect-pids", default="", help="comma-separated ready worker pids")
    parser.add_argument("--expect-traffic", action="store_true", help="the chart must show some")
    parser.add_argument("--rollback", action="store_true", help="roll back after the reload")
    parser.add_argument("--screenshot", required=True)
    parser.add_argument("--docs", action="store_true", help="take the screenshot for docs/")
    parser.add_argument("--min-points", type=int, default=90)
    parser.add_argument(
        "--expect-not-running",
        action="append",
        default=[],
        metavar="NAME=VERSION",
        help="check only that the page lists these services as kept but not running",
    )
    args = parser.parse_args()
    token = os.environ.get("ADMIN_TOKEN", "").strip()
    if not token:
        print("ADMIN_TOKEN is not set", file=sys.stderr)
        return 1
    expect = sorted(int(p) for p in args.expect_pids.split(",") if p)

    profile = tempfile.mkdtemp(prefix="admin-page-chromium-")
    driver = None
    try:
        driver = start_browser(profile)
        page = Page(driver, args.url, args.service)
        if args.docs:
            docs(page, token, args)
            result = {}
        elif args.expect_not_running:
            shown = sign_in_by_fragment(page, token, expect)
            dormant = dict(pair.split("=", 1) for pair in args.expect_not_running)
            result = {"shown": shown, "not_running": check_not_running(page, dormant)}
        else:
            shown = sign_in_by_fragment(page, token, expect, args.expect_traffic)
            if page.visible("dormant"):
                raise Failed("'Kept, not running' is shown, but the host keeps no such service")
            after = reload_from_page(page, shown)
            result = {"shown": shown, "after_reload": after}
            if args.rollback:
                after = rollback_from_page(page, after)
                result["after_rollback"] = after
            survive_page_reload(page, after)
            sign_in_by_form(page, token, after)
        driver.save_screenshot(args.screenshot)
        page.check_console("end")
        print(json.dumps(result), flush=True)
        return 0
    except Failed as e:
        print(f"admin_page.py: FAILED: {e}", file=sys.stderr)
        if driver is not None:
            try:
                driver.save_screenshot(args.screenshot)
                print(f"(screenshot of the failure: {args.screenshot})", file=sys.stderr)
            except Exception:
                pass
        return 1
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
