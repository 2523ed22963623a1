// The example host app (examples/host): its own login form and session, sse-notify under
// /notify taking the identity from that session, toasts on its page, and logout ending
// the stream.
import { test, expect, Server, PUBLISH_KEY } from "./fixtures";
import type { Page } from "@playwright/test";

let host: Server;
test.beforeEach(async () => {
  host = await Server.startHost();
});
test.afterEach(async ({ context }) => {
  await context.close();
  await host.stop();
});

async function logIn(page: Page, name: string): Promise<void> {
  await page.goto(host.url("/login"));
  await page.locator('input[name="username"]').fill(name);
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page.getByTestId("user")).toHaveText(name);
  await expect(page.locator("[data-hydrated=true]")).toBeVisible();
  await expect(page.getByTestId("stream")).toHaveAttribute("data-status", "open");
}

async function clients(): Promise<number> {
  const res = await fetch(host.url("/notify/api/stats"), { headers: { authorization: `Bearer ${PUBLISH_KEY}` } });
  return (await res.json()).clients;
}

test("log in through the host's form and receive a toast from its server function", async ({ page }) => {
  // The page names no URL: the server's render hands it the prefix the routes are under.
  const streams: string[] = [];
  page.on("request", (r) => {
    const path = new URL(r.url()).pathname;
    if (r.method() === "GET" && path.endsWith("/api/sse")) streams.push(path);
  });
  await logIn(page, "hostuser");
  expect(streams.length).toBeGreaterThan(0);
  expect(streams.every((p) => p === "/notify/api/sse")).toBe(true);
  await page.getByTestId("notify-me").click();
  const toast = page.locator(".sse-toast", { hasText: "Hello from the host" });
  await expect(toast).toBeVisible();
  await expect(toast).toContainText("Sent to hostuser");
  // The host's own health route, and sse-notify's under the prefix.
  expect(await (await fetch(host.url("/healthz"))).text()).toBe("ok");
  expect((await (await fetch(host.url("/notify/healthz"))).json()).status).toBe("ok");
});

test("the host's own element rules do not reach into the toasts or the bell", async ({ page }) => {
  await host.stop();
  host = await Server.startHost({ SSE_INBOX_URL: "sqlite:temp" });
  await logIn(page, "styled");
  // The host's rules apply to its own elements...
  const own = page.getByTestId("notify-me");
  expect(await own.evaluate((e) => getComputedStyle(e).textTransform)).toBe("uppercase");
  await own.click();
  // ...and stop at the toast's and the bell's edge.
  const toast = page.locator(".sse-toast", { hasText: "Hello from the host" });
  await expect(toast).toBeVisible();
  const style = (selector: string) =>
    page.locator(selector).first().evaluate((e) => {
      const s = getComputedStyle(e);
      return { transform: s.textTransform, spacing: s.letterSpacing, lineHeight: s.lineHeight, fontSize: s.fontSize };
    });
  for (const selector of [".sse-toast__close", ".sse-inbox__bell"]) {
    const s = await style(selector);
    expect(s.transform, selector).toBe("none");
    expect(s.spacing, selector).toBe("normal");
  }
  // The host's button padding would squeeze the bell's icon (its button is border-box).
  expect((await page.locator(".sse-inbox__bell svg").boundingBox())?.width).toBeCloseTo(22, 0);
  const message = await style(".sse-toast__message");
  // The toasts' own 1.4, not the host's 2.2.
  expect(parseFloat(message.lineHeight) / parseFloat(message.fontSize)).toBeCloseTo(1.4, 1);
});

test("another user of the host receives nothing of the first user's", async ({ page, browser }) => {
  const other = await browser.newContext();
  const otherPage = await other.newPage();
  await logIn(page, "first");
  await logIn(otherPage, "second");
  await page.getByTestId("notify-me").click();
  await expect(page.locator(".sse-toast", { hasText: "Hello from the host" })).toBeVisible();
  await otherPage.waitForTimeout(1_000);
  await expect(otherPage.locator(".sse-toast")).toHaveCount(0);
  await other.close();
});

test("the host's logout ends the user's stream, which stays closed", async ({ page, context }) => {
  await logIn(page, "leaving");
  expect(await clients()).toBe(1);
  // Log out from a second tab of the same browser: the first keeps its page.
  const other = await context.newPage();
  await other.goto(host.url("/"));
  await expect(other.getByTestId("user")).toHaveText("leaving");
  await other.getByTestId("logout").click();
  await expect(other).toHaveURL(/\/login$/);
  await expect(page.getByTestId("stream")).toHaveAttribute("data-status", "closed");
  await page.waitForTimeout(3_000);
  await expect(page.getByTestId("stream")).toHaveAttribute("data-status", "closed");
  expect(await clients()).toBe(0);
});

test("the host's notification bell: live count under the prefix, server-rendered after a reload", async ({ page }) => {
  await host.stop();
  host = await Server.startHost({ SSE_INBOX_URL: "sqlite:temp" });
  await logIn(page, "belluser");
  await expect(page.locator(".sse-inbox__badge")).toHaveCount(0);
  await page.getByTestId("notify-me").click();
  await expect(page.locator(".sse-inbox__badge")).toHaveText("1");
  await page.reload();
  await expect(page.locator("[data-hydrated=true]")).toBeVisible();
  await expect(page.locator(".sse-inbox__badge")).toHaveText("1");
  await page.locator(".sse-inbox__bell").click();
  // The read goes to the inbox under the prefix the page learned from the server's render
  // (the badge alone would drop locally even if the request failed).
  const marked = page.waitForResponse((r) => new URL(r.url()).pathname === "/notify/api/inbox/read");
  await page.locator(".sse-inbox__item", { hasText: "Hello from the host" }).locator(".sse-inbox__open").click();
  expect((await marked).ok()).toBe(true);
  await expect(page.locator(".sse-inbox__badge")).toHaveCount(0);
  await expect(page.locator(".sse-inbox__error")).toHaveCount(0);
});
