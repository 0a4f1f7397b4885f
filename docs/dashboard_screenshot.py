"""Screenshot the Ray dashboard in headless Chromium after logging in with the cluster's token.

In:  a running Ray dashboard (--url), its token (`ray get-auth-token`), a Chromium binary.
Out: --out PNG of one dashboard view (#/actors, #/jobs, ...), taken the way a user sees it: the token is typed
     into the dashboard's login dialog and submitted, then the view is opened.

    python docs/dashboard_screenshot.py --url http://127.0.0.1:8265 --view actors --out docs/dashboard-actors.png

Drives Chromium over the DevTools protocol with aiohttp (already installed with ray[default]).
"""
import argparse
import asyncio
import base64
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8265", help="the dashboard address train.py prints")
    parser.add_argument("--view", default="actors", help="dashboard page after login: actors, jobs, cluster, overview")
    parser.add_argument("--out", default="docs/dashboard-actors.png")
    parser.add_argument("--token", help="auth token (default: what `ray get-auth-token` prints)")
    parser.add_argument("--chromium", default="chromium")
    parser.add_argument("--size", default="1400,900", help="window width,height in pixels")
    parser.add_argument("--settle", type=float, default=6.0, help="seconds to let the view load its data")
    return parser.parse_args(argv)


class Page:
    """One Chromium tab over the DevTools protocol: send a command, wait for its answer."""

    def __init__(self, socket):
        self.socket, self.ids = socket, itertools.count(1)

    async def send(self, method, **params):
        message_id = next(self.ids)
        await self.socket.send_json({"id": message_id, "method": method, "params": params})
        async for message in self.socket:
            reply = json.loads(message.data)
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
        raise RuntimeError(f"{method}: DevTools connection closed")

    async def evaluate(self, expression):
        return (await self.send("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")

    async def holds(self, expression):
        try:
            return await self.evaluate(f"!!({expression})")
        except RuntimeError:  # the page is still loading: no document to evaluate in yet
            return False

    async def wait_for(self, expression, what, timeout=60.0):
        deadline = time.time() + timeout
        while not await self.holds(expression):
            if time.time() > deadline:
                raise SystemExit(f"error: {what} did not appear within {timeout:g} s")
            await asyncio.sleep(0.5)


async def screenshot(args, token, devtools_port):
    async with aiohttp.ClientSession() as session:
        try:
            async with session.get(args.url) as response:
                response.raise_for_status()
        except aiohttp.ClientError as error:
            raise SystemExit(f"error: {args.url}: no dashboard there ({error})")
        async with session.put(f"http://127.0.0.1:{devtools_port}/json/new?{args.url}") as response:
            target = await response.json(content_type=None)
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as socket:
            page = Page(socket)
            token_field = "document.querySelector('input[placeholder*=\"authentication token\" i]')"
            await page.wait_for(token_field, "the login dialog")
            await page.evaluate(f"{token_field}.focus()")
            await page.send("Input.insertText", text=token)  # typed, so the dialog's own handlers see it
            await page.evaluate("[...document.querySelectorAll('button')].find(b => /submit/i.test(b.textContent)).click()")
            await page.wait_for(f"!{token_field}", "the dashboard behind the login dialog")
            await page.send("Page.navigate", url=f"{args.url}/#/{args.view}")
            await asyncio.sleep(args.settle)
            if await page.holds(token_field):
                raise SystemExit("error: the dashboard asked for the token again; the login did not hold")
            shot = await page.send("Page.captureScreenshot", format="png")
    return shot["data"]


def main(argv=None):
    args = parse_args(argv)
    token = args.token or subprocess.run([str(Path(sys.executable).with_name("ray")), "get-auth-token"],
                                         capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen([args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                    f"--window-size={args.size}", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                                    "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.time() + 30
            while not port_file.exists() or not port_file.read_text().strip():
                if time.time() > deadline or browser.poll() is not None:
                    sys.exit(f"error: {args.chromium} did not open its DevTools port")
                time.sleep(0.2)
            png = asyncio.run(screenshot(args, token, int(port_file.read_text().split()[0])))
        finally:
            browser.terminate()
            browser.wait(timeout=30)
    Path(args.out).write_bytes(base64.b64decode(png))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
