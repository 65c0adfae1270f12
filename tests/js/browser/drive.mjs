// Drives Debian's headless Chromium with playwright-core for tests/e2e/test_browser.py.
//
//   node drive.mjs '{"chromium": "/usr/bin/chromium", "spki": "<base64 sha256>", "visits": [url, ...],
//                    "timeout": 15000}'
//
// One browser (a new, empty profile that Playwright makes and removes), trusting the test's wss
// certificate by its SPKI pin only. Each visit opens the URL in a fresh browser context, waits until the
// page has put its result in window.mqttResult (tests/js/browser/page.js), and records what the page,
// its console and its WebSockets said. Prints one JSON line: {browser, visits: [...]}, or {error}.
import { chromium } from "playwright-core";

const config = JSON.parse(process.argv[2]);

// As the machine notes say for headless Chromium as root on a closed network: no sandbox (root), no
// GPU, no QUIC, and none of the background connections to Google's hosts.
const args = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  `--ignore-certificate-errors-spki-list=${config.spki}`,
];

async function visit(browser, url) {
  const context = await browser.newContext();
  const page = await context.newPage();
  const record = { url, console: [], pageErrors: [], websockets: [], result: null, dom: null };
  page.on("console", (msg) => record.console.push(`${msg.type()}: ${msg.text()}`));
  page.on("pageerror", (err) => record.pageErrors.push(String(err)));
  page.on("websocket", (ws) => {
    const entry = { url: ws.url(), errors: [], closed: false, framesReceived: 0 };
    record.websockets.push(entry);
    ws.on("socketerror", (err) => entry.errors.push(String(err)));
    ws.on("framereceived", () => { entry.framesReceived += 1; });
    ws.on("close", () => { entry.closed = true; });
  });
  try {
    await page.goto(url, { waitUntil: "load", timeout: config.timeout });
    await page.waitForFunction(() => window.mqttResult !== undefined, null, { timeout: config.timeout });
    record.result = await page.evaluate(() => window.mqttResult);
    record.dom = await page.textContent("#result");
  } catch (err) {
    record.error = String(err);
  } finally {
    await context.close();
  }
  return record;
}

let browser = null;
try {
  browser = await chromium.launch({ executablePath: config.chromium, headless: true, args, timeout: config.timeout });
  const visits = [];
  for (const url of config.visits) {
    visits.push(await visit(browser, url)); // in order: a reused credential must come after its first use
  }
  console.log(JSON.stringify({ browser: browser.version(), visits }));
} catch (err) {
  console.log(JSON.stringify({ error: String(err && err.stack ? err.stack : err) }));
  process.exitCode = 1;
} finally {
  if (browser !== null) await browser.close();
}
