// The notification center as a person uses it: the bell's count from the server's HTML,
// reading in one tab and seeing every other tab and device follow, users kept apart, and
// how the open panel looks (desktop and 390 px, light and dark).
import { test, expect, signIn, openLive } from "./fixtures";
import type { BrowserContext, Page } from "@playwright/test";
import * as path from "node:path";

test.use({ serverEnv: { SSE_INBOX_URL: "sqlite:temp" } });

const badge = (page: Page) => page.locator(".sse-inbox__badge");

async function cookieOf(context: BrowserContext): Promise<string> {
  const cookies = await context.cookies();
  return cookies.map((c) => `${c.name}=${c.value}`).join("; ");
}

test("the unread count is in the server's HTML, before any script runs", async ({ page, context, server }) => {
  await signIn(context, server, "ssr-count");
  for (const title of ["one", "two", "three"]) await server.notify("ssr-count", title);
  const html = await (await context.request.get(server.url("/"), { headers: { cookie: await cookieOf(context) } })).text();
  // (A debug build marks text nodes with `<!>` for hydration.)
  expect(html).toMatch(/<span(?=[^>]*class="sse-inbox__badge")(?=[^>]*data-count="3")[^>]*>3(<!>)?<\/span>/);
  await openLive(page, server);
  await expect(badge(page)).toHaveText("3");
  await expect(page.locator(".sse-inbox__bell")).toHaveAttribute("aria-label", "Notifications, 3 unread");
});

// `make build` is a `cargo leptos build --split`: the panel is a WASM chunk of its own.
test("the panel's code loads when the bell is first opened, not with the page", async ({ page, context, server }) => {
  const chunks: string[] = [];
  page.on("request", (r) => {
    if (/\/split_[^/]*\.wasm$/.test(new URL(r.url()).pathname)) chunks.push(r.url());
  });
  await signIn(context, server, "lazy-panel");
  await server.notify("lazy-panel", "Loaded later");
  await openLive(page, server);
  await expect(badge(page)).toHaveText("1");
  await page.waitForLoadState("networkidle");
  expect(chunks).toEqual([]);
  await page.locator(".sse-inbox__bell").click();
  await expect(page.locator(".sse-inbox__item", { hasText: "Loaded later" })).toBeVisible();
  expect(chunks).toHaveLength(1);
  // Closed and opened again: the chunk is not fetched twice.
  await page.keyboard.press("Escape");
  await page.locator(".sse-inbox__bell").click();
  await expect(page.locator(".sse-inbox__item", { hasText: "Loaded later" })).toBeVisible();
  expect(chunks).toHaveLength(1);
});

test("reading in one tab updates the other tabs and another device at once", async ({ browser, page, context, server }) => {
  await signIn(context, server, "reader");
  await server.notify("reader", "First");
  await server.notify("reader", "Second");
  await openLive(page, server);
  const otherTab = await context.newPage();
  await openLive(otherTab, server);
  const phone = await browser.newContext({ viewport: { width: 390, height: 800 } });
  await signIn(phone, server, "reader");
  const phonePage = await phone.newPage();
  await openLive(phonePage, server);
  for (const p of [page, otherTab, phonePage]) await expect(badge(p)).toHaveText("2");

  await page.locator(".sse-inbox__bell").click();
  const second = page.locator(".sse-inbox__item", { hasText: "Second" });
  await expect(second).toHaveAttribute("data-unread", "true");
  await second.locator(".sse-inbox__open").click();
  await expect(page.locator(".sse-inbox__item", { hasText: "Second" })).toHaveAttribute("data-unread", "false");
  for (const p of [page, otherTab, phonePage]) await expect(badge(p)).toHaveText("1");

  // A new one arrives while the panel is open: it shows at the top.
  await server.notify("reader", "Third");
  await expect(page.locator(".sse-inbox__item").first()).toContainText("Third");
  for (const p of [page, otherTab, phonePage]) await expect(badge(p)).toHaveText("2");

  await page.getByRole("button", { name: "Mark all as read" }).click();
  for (const p of [page, otherTab, phonePage]) await expect(badge(p)).toHaveCount(0);
  await expect(page.locator('.sse-inbox__item[data-unread="true"]')).toHaveCount(0);
  await phone.close();
});

test("archiving removes an item, Escape closes the panel and gives focus back to the bell", async ({ page, context, server }) => {
  await signIn(context, server, "archiver");
  await server.notify("archiver", "Keep me");
  await server.notify("archiver", "Archive me");
  await openLive(page, server);
  const bell = page.locator(".sse-inbox__bell");
  await bell.click();
  await expect(bell).toHaveAttribute("aria-expanded", "true");
  const archived = page.waitForResponse((r) => r.url().endsWith("/api/inbox/archive"));
  await page.locator(".sse-inbox__item", { hasText: "Archive me" }).getByRole("button", { name: "Archive", exact: true }).click();
  await expect(page.locator(".sse-inbox__item")).toHaveCount(1);
  // The reload below must find the server's answer, not race the request.
  expect((await archived).status()).toBe(200);
  await expect(badge(page)).toHaveText("1");
  await page.keyboard.press("Escape");
  await expect(page.locator(".sse-inbox__panel")).toHaveCount(0);
  await expect(bell).toBeFocused();
  // Still archived after a reload (the server has it).
  await openLive(page, server);
  await bell.click();
  await expect(page.locator(".sse-inbox__item")).toHaveCount(1);
});

test("following an item's link marks it read on the server, though the page goes away", async ({ page, context, server }) => {
  await signIn(context, server, "follower");
  await server.notify("follower", "Your export is ready", { actionUrl: "/downloads/42" });
  await openLive(page, server);
  await page.locator(".sse-inbox__bell").click();
  await page.locator(".sse-inbox__item", { hasText: "Your export is ready" }).locator(".sse-inbox__open").click();
  await page.waitForURL(/\/downloads\/42$/);
  const unread = async () =>
    (await (await context.request.get(server.url("/api/inbox?limit=1"))).json()).unread as number;
  await expect.poll(unread).toBe(0);
});

test("back after a while: one summary toast instead of a burst, the rest in the inbox", async ({ page, context, server }) => {
  await signIn(context, server, "returning");
  for (let i = 1; i <= 6; i++) await server.notify("returning", `Missed ${i}`);
  // The first stream replays what waited for the user: six toasts' worth, summed up.
  await openLive(page, server);
  const summary = page.locator(".sse-toast", { hasText: "6 new notifications" });
  await expect(summary).toBeVisible();
  await expect(page.locator(".sse-toast", { hasText: /Missed \d/ })).toHaveCount(0);
  await summary.getByRole("button", { name: "Show" }).click();
  await expect(page.locator(".sse-inbox__panel")).toBeVisible();
  await expect(page.locator(".sse-inbox__bell")).toBeFocused();
  await expect(page.locator(".sse-inbox__item")).toHaveCount(6);
  await expect(page.locator(".sse-toast", { hasText: "6 new notifications" })).toHaveCount(0);
  // What comes live is toasted as usual.
  await server.notify("returning", "Live one");
  await expect(page.locator(".sse-toast", { hasText: "Live one" })).toBeVisible();
});

test("one user never sees another's items", async ({ browser, page, context, server }) => {
  await signIn(context, server, "alice-inbox");
  await server.notify("alice-inbox", "For alice only");
  const bob = await browser.newContext();
  await signIn(bob, server, "bob-inbox");
  const bobPage = await bob.newPage();
  await openLive(bobPage, server);
  await openLive(page, server);
  await expect(badge(page)).toHaveText("1");
  await expect(badge(bobPage)).toHaveCount(0);
  await bobPage.locator(".sse-inbox__bell").click();
  await expect(bobPage.locator(".sse-inbox__empty")).toBeVisible();
  await expect(bobPage.locator(".sse-inbox__panel")).not.toContainText("For alice only");
  await bob.close();
});

for (const width of [1280, 390]) {
  for (const scheme of ["light", "dark"] as const) {
    test(`the open panel at ${width} px, ${scheme}`, async ({ page, context, server }) => {
      await page.setViewportSize({ width, height: 800 });
      await page.emulateMedia({ colorScheme: scheme });
      await signIn(context, server, "looks");
      await server.notify("looks", "Your export is ready", { actionUrl: "/downloads/42", type: "success" });
      await server.notify("looks", "Payment received", { type: "success" });
      await server.notify("looks", "Storage almost full", { type: "warning" });
      await server.notify("looks", "Weekly report", { type: "info" });
      // Replayed when the page opens: more than three, so one summary toast.
      // Toasts at the bottom, as an app with a bell in its top bar would have them.
      await openLive(page, server, "?auto=false&position=bottom-right");
      await page.locator(".sse-inbox__bell").click();
      await page.locator(".sse-inbox__item", { hasText: "Payment received" }).locator(".sse-inbox__open").click();
      const panel = page.locator(".sse-inbox__panel");
      await expect(panel).toBeVisible();
      await expect(page.locator(".sse-toast", { hasText: "4 new notifications" })).toBeVisible();
      const box = (await panel.boundingBox())!;
      expect(box.x).toBeGreaterThanOrEqual(0);
      expect(box.x + box.width).toBeLessThanOrEqual(width);
      await page.screenshot({ path: path.join("test-results", `inbox-${width}-${scheme}.png`) });
    });
  }
}
