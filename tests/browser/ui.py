"""Berth's web UI in headless Chromium (Debian's chromium and chromedriver, driven by
Selenium): the checks of issue 21 that need a real browser. Run by the Rust test
`ui::real_clients_in_chromium_*`, which starts Berth, fills it and writes what the pages must
show (from skopeo inspect) to the JSON file given as the only argument.

Prints PASS/FAIL per check and exits 1 when one failed; saves a screenshot of each page to the
directory the JSON names."""

import base64
import http.server
import json
import os
import sys
import threading
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

cfg = json.load(open(sys.argv[1]))
base = cfg["base"]
shots = cfg["screenshots"]
os.makedirs(shots, exist_ok=True)
failed = []


def check(name, ok, detail=""):
    print(("PASS " if ok else "FAIL ") + name + ("" if ok else f": {detail}"), flush=True)
    if not ok:
        failed.append(name)


def browser():
    o = Options()
    o.binary_location = cfg.get("chromium", "/usr/bin/chromium")
    for a in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100",
              "--disable-gpu", "--no-first-run", "--disable-background-networking"]:
        o.add_argument(a)
    d = webdriver.Chrome(service=Service(cfg.get("chromedriver", "/usr/bin/chromedriver")), options=o)
    d.set_page_load_timeout(30)
    return d


def shot(d, name):
    d.save_screenshot(os.path.join(shots, name + ".png"))


def sign_in(d, user, password):
    d.delete_all_cookies()
    d.get(base + "/ui/login")
    d.find_element(By.ID, "login-user").send_keys(user)
    d.find_element(By.ID, "login-password").send_keys(password)
    d.find_element(By.ID, "login-submit").click()
    WebDriverWait(d, 10).until(EC.presence_of_element_located((By.ID, "user")))


def tag_exists(repo, tag):
    req = urllib.request.Request(f"{base}/v2/{repo}/manifests/{tag}", method="HEAD")
    creds = base64.b64encode(b"alice:alice-pw").decode()
    req.add_header("Authorization", "Basic " + creds)
    req.add_header("Accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json")
    try:
        return urllib.request.urlopen(req, timeout=10).status == 200
    except urllib.error.HTTPError:
        return False


def rows(d, table_id):
    return d.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr")


d = browser()
try:
    # Anonymous: only what anonymous may pull.
    d.get(base + "/")
    check("a browser asking for / lands on /ui/", d.current_url.rstrip("/").endswith("/ui"), d.current_url)
    listed = lambda: [a.text for a in d.find_elements(By.CSS_SELECTOR, "#repositories td a")]
    d.get(base + "/ui/?q=web")
    check("anonymous sees public repositories", listed() == ["web/app", "web/multi"], listed())
    d.get(base + "/ui/?q=team")
    check("anonymous does not see private ones", listed() == [], listed())
    d.get(base + "/ui/")

    # Search among 10,000.
    box = d.find_element(By.ID, "q")
    box.clear()
    box.send_keys(cfg["search"]["needle"] + "\n")
    WebDriverWait(d, 10).until(EC.url_contains("q="))
    found = [a.text for a in d.find_elements(By.CSS_SELECTOR, "#repositories td a")]
    check("search finds one repository among 10,000", found == [cfg["search"]["expect"]], found)
    d.get(base + "/ui/?q=web")
    shot(d, "repositories")

    # The image page against skopeo inspect.
    img = cfg["image"]
    d.get(base + f"/ui/repo?name={img['repo']}")
    shot(d, "repository")
    d.find_element(By.LINK_TEXT, img["tag"]).click()
    WebDriverWait(d, 10).until(EC.presence_of_element_located((By.ID, "layers")))
    got = [(r.get_attribute("data-digest"), int(r.get_attribute("data-bytes"))) for r in rows(d, "layers")]
    want = [(l["digest"], l["size"]) for l in img["skopeo"]["raw"]["layers"]]
    check("the image page's layers and sizes are skopeo's", got == want, f"{got} != {want}")
    platform = d.find_element(By.ID, "platform").text
    want_platform = f"{img['skopeo']['config']['os']}/{img['skopeo']['config']['architecture']}"
    check("the image page's platform is skopeo's", platform == want_platform, f"{platform} != {want_platform}")
    history = [r.find_element(By.CSS_SELECTOR, "td.history").text for r in rows(d, "layers")]
    check("each layer shows the command that made it", all(h.startswith("RUN make step-") for h in history), history)
    tree = d.find_element(By.ID, "referrers")
    tops = tree.find_elements(By.CSS_SELECTOR, ":scope > ul > li")
    nested = tree.find_elements(By.CSS_SELECTOR, "ul ul li")
    top_digests = sorted(li.get_attribute("data-digest") for li in tops)
    check("the referrers tree shows the signature and the SBOM", top_digests == sorted(cfg["referrers"]["top"]), top_digests)
    check("the SBOM's signature is nested under the SBOM",
          [li.get_attribute("data-digest") for li in nested] == [cfg["referrers"]["nested"]], tree.text)
    copy = d.find_element(By.CSS_SELECTOR, "button.copy")
    copy.click()
    WebDriverWait(d, 5).until(lambda _: copy.text == "Copied")
    check("a pull command's copy button answers", copy.text == "Copied", copy.text)
    shot(d, "image")

    # An index: the platforms skopeo reports.
    d.get(base + f"/ui/image?name={cfg['index']['repo']}&ref={cfg['index']['tag']}")
    got = [r.find_element(By.CSS_SELECTOR, "td.platform").text for r in rows(d, "platforms")]
    want = []
    for m in cfg["index"]["raw"]["manifests"]:
        p = m["platform"]
        want.append("/".join([p["os"], p["architecture"]] + ([p["variant"]] if p.get("variant") else [])))
    check("the index page's platforms are skopeo's", got == want, f"{got} != {want}")

    # Compare.
    c = cfg["compare"]
    d.get(base + f"/ui/image?name={c['repo']}&ref={c['a']}")
    from selenium.webdriver.support.ui import Select
    Select(d.find_element(By.ID, "compare-with")).select_by_value(c["b"])
    d.find_element(By.CSS_SELECTOR, "form.compare button").click()
    WebDriverWait(d, 10).until(EC.presence_of_element_located((By.ID, "shared")))
    pick = lambda t: [r.get_attribute("data-digest") for r in rows(d, t)]
    check("compare: shared layers", pick("shared") == c["shared"], pick("shared"))
    check("compare: removed layers", pick("removed") == c["removed"], pick("removed"))
    check("compare: added layers", pick("added") == c["added"], pick("added"))
    shot(d, "compare")

    # The cache page.
    d.get(base + "/ui/cache")
    up = d.find_elements(By.CSS_SELECTOR, "section.upstream")
    check("the cache page shows the upstream", len(up) == 1 and "up" in up[0].text, [u.text for u in up])
    check("the cache page lists the cached image among the most pulled",
          cfg["cached"] in d.find_element(By.CSS_SELECTOR, "table.top").text, d.page_source[:500])
    shot(d, "cache")

    # bob may pull team/app, not delete: no button; a request forged with his own token: 403.
    sign_in(d, "bob", "bob-pw")
    d.get(base + "/ui/repo?name=team/app")
    check("bob sees the private repository he may pull", len(rows(d, "tags")) == 2, d.page_source[:300])
    check("bob gets no delete button", not d.find_elements(By.CSS_SELECTOR, "form.delete"), "")
    status = d.execute_script("""
        const token = document.querySelector('input[name=csrf]').value;
        const body = new URLSearchParams({csrf: token, name: 'team/app', tag: '1'});
        return fetch('/ui/delete', {method: 'POST', body, redirect: 'manual'}).then(r => r.status);
    """)
    check("a delete forged by bob is refused with 403", status == 403, status)
    check("and deleted nothing", tag_exists("team/app", "1"), "")

    # alice may: confirm, and the tag is gone.
    sign_in(d, "alice", "alice-pw")
    d.get(base + "/ui/repo?name=team/app")
    token = d.find_element(By.CSS_SELECTOR, "input[name=csrf]").get_attribute("value")
    d.find_element(By.CSS_SELECTOR, "tr[data-tag='1'] form.delete button").click()
    WebDriverWait(d, 5).until(EC.alert_is_present())
    d.switch_to.alert.dismiss()
    check("dismissing the confirmation deletes nothing", tag_exists("team/app", "1"), "")
    d.find_element(By.CSS_SELECTOR, "tr[data-tag='1'] form.delete button").click()
    WebDriverWait(d, 5).until(EC.alert_is_present())
    d.switch_to.alert.accept()
    WebDriverWait(d, 10).until(lambda _: not d.find_elements(By.CSS_SELECTOR, "tr[data-tag='1']"))
    check("alice deletes a tag after confirming", not tag_exists("team/app", "1") and tag_exists("team/app", "2"), "")

    # A cross-site form, posted while alice is signed in, with her real token: refused.
    evil = f"""<html><body><form id="f" method="post" action="{base}/ui/delete">
      <input name="csrf" value="{token}"><input name="name" value="team/app"><input name="tag" value="2">
      </form><script>document.getElementById('f').submit()</script></body></html>""".encode()

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(evil)

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Evil)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    d.get(f"http://127.0.0.1:{srv.server_address[1]}/")
    WebDriverWait(d, 10).until(lambda _: "/ui/delete" in d.current_url)
    check("a cross-site POST is refused", "cross-site request refused" in d.page_source, d.page_source[:400])
    check("and deleted nothing", tag_exists("team/app", "2"), "")
    srv.shutdown()
finally:
    d.quit()

print(f"{len(failed)} failed")
sys.exit(1 if failed else 0)
