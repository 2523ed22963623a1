// How the toasts look and behave for a person: themes, the toaster API, action buttons,
// a hidden tab, banners that leave the stack visible, narrow screens. Screenshots of
// desktop and 390 px, light and dark, go to test-results/ (and docs/ with SCREENSHOTS=1).
import { test, expect, signIn, openLive } from "./fixtures";
import type { Page } from "@playwright/test";

async function background(page: Page, title: string): Promise<string> {
  return page
    .locator(".sse-toast", { hasText: title })
    .evaluate((el) => getComputedStyle(el).backgroundColor);
}

test("dark and light themes render differently, and the system's preference is followed", async ({ page, context, server }) => {
  await signIn(context, server, "themes");
  await openLive(page, server, "?auto=false&theme=light");
  await server.notify("themes", "Light toast");
  const light = await background(page, "Light toast");
  await openLive(page, server, "?auto=false&theme=dark");
  await server.notify("themes", "Dark toast");
  const dark = await background(page, "Dark toast");
  expect(dark).not.toEqual(light);
  await page.emulateMedia({ colorScheme: "dark" });
  await openLive(page, server, "?auto=false");
  await server.notify("themes", "System toast");
  expect(await background(page, "System toast")).toEqual(dark);
});

test("the status badge's dot turns from grey to the success colour once the stream is live", async ({ page, context, server }) => {
  await signIn(context, server, "badge");
  await openLive(page, server);
  const dot = page.locator('.status[data-status="open"] .status__dot');
  const live = await dot.evaluate((el) => getComputedStyle(el).backgroundColor);
  const offline = await page.evaluate(() => {
    const probe = document.createElement("p");
    probe.className = "status";
    probe.dataset.status = "closed";
    probe.innerHTML = '<span class="status__dot"></span>';
    document.body.append(probe);
    const colour = getComputedStyle(probe.firstElementChild!).backgroundColor;
    probe.remove();
    return colour;
  });
  expect(live).not.toEqual(offline);
});

test("a toast that arrives in a hidden tab waits until the tab is seen, then dismisses itself", async ({ page, context, server }) => {
  await signIn(context, server, "hidden");
  await openLive(page, server, "?dismiss=1500");
  const setVisibility = (state: "hidden" | "visible") =>
    page.evaluate((s) => {
      Object.defineProperty(document, "visibilityState", { value: s, configurable: true });
      Object.defineProperty(document, "hidden", { value: s === "hidden", configurable: true });
      document.dispatchEvent(new Event("visibilitychange", { bubbles: true }));
    }, state);
  await setVisibility("hidden");
  await server.notify("hidden", "While you were away");
  const toast = page.locator(".sse-toast", { hasText: "While you were away" });
  await expect(toast).toBeVisible();
  await page.waitForTimeout(3_500); // more than twice the delay
  await expect(toast).toBeVisible();
  await setVisibility("visible");
  await expect(toast).toBeHidden({ timeout: 5_000 });
});

test("the toaster API: a loading toast becomes its result in place", async ({ page, context, server }) => {
  await signIn(context, server, "toaster");
  await openLive(page, server);
  await page.getByTestId("toast-promise").click();
  const loading = page.locator(".sse-toast", { hasText: "Saving your draft" });
  await expect(loading).toHaveAttribute("data-kind", "loading");
  const key = await loading.getAttribute("data-toast-key");
  const done = page.locator(`.sse-toast[data-toast-key="${key}"]`);
  await expect(done).toContainText("Draft saved");
  await expect(done).toHaveAttribute("data-kind", "success");
});

test("an action button runs its callback and dismisses the toast", async ({ page, context, server }) => {
  await signIn(context, server, "undo");
  await openLive(page, server);
  await page.getByTestId("toast-action").click();
  const toast = page.locator(".sse-toast", { hasText: "Conversation archived" });
  await toast.getByRole("button", { name: "Undo" }).click();
  await expect(page.getByTestId("undo-result")).toHaveText("Archive undone");
  await expect(toast).toHaveCount(0);
});

test("Escape dismisses only with focus inside the toasts", async ({ page, context, server }) => {
  await signIn(context, server, "escape");
  await openLive(page, server, "?auto=false");
  await server.notify("escape", "Stays put");
  const toast = page.locator(".sse-toast", { hasText: "Stays put" });
  await expect(toast).toBeVisible();
  await page.getByTestId("title").focus();
  await page.keyboard.press("Escape");
  await page.waitForTimeout(500);
  await expect(toast).toBeVisible();
  await toast.focus();
  await page.keyboard.press("Escape");
  await expect(toast).toHaveCount(0);
});

test("past the maximum, a +N more chip counts the toasts waiting", async ({ page, context, server }) => {
  await signIn(context, server, "many");
  await openLive(page, server, "?auto=false&max=2");
  for (const n of [1, 2, 3, 4, 5]) await server.notify("many", `Many ${n}`);
  await expect(page.getByTestId("toasts-more")).toHaveText("+3 more");
});

for (const [width, height] of [
  [1280, 800],
  [390, 844],
]) {
  test(`at ${width} px a system alert banner leaves the first toast visible, and nothing overflows sideways`, async ({ page, context, server }) => {
    await page.setViewportSize({ width, height });
    await signIn(context, server, `banner-${width}`);
    await openLive(page, server, "?auto=false");
    await server.notify(`banner-${width}`, "Under the banner?");
    const { status } = await server.publish({
      broadcast: true,
      event: "system_alert",
      data: { message: "Maintenance tonight at 22:00 UTC", type: "maintenance" },
    });
    expect(status).toBe(202);
    const toast = page.locator(".sse-toast", { hasText: "Under the banner?" });
    const banner = page.locator(".sse-banners .sse-toast");
    await expect(banner).toBeVisible();
    const [t, b] = [(await toast.boundingBox())!, (await banner.boundingBox())!];
    const overlap = t.y < b.y + b.height && b.y < t.y + t.height && t.x < b.x + b.width && b.x < t.x + t.width;
    expect(overlap, `toast ${JSON.stringify(t)} under banner ${JSON.stringify(b)}`).toBe(false);
    const scroll = await page.evaluate(() => document.documentElement.scrollWidth);
    expect(scroll).toBeLessThanOrEqual(width);
  });
}

for (const scheme of ["light", "dark"] as const) {
  for (const [name, width, height] of [
    ["desktop", 1280, 800],
    ["mobile", 390, 844],
  ] as const) {
    test(`screenshot: ${name}, ${scheme}`, async ({ page, context, server }, testInfo) => {
      await page.emulateMedia({ colorScheme: scheme });
      await page.setViewportSize({ width, height });
      await signIn(context, server, `shot-${scheme}-${name}`);
      await openLive(page, server, "?auto=false");
      const user = `shot-${scheme}-${name}`;
      await server.notify(user, "Payment received", { type: "success", actionUrl: "/billing" });
      await server.notify(user, "Card expires soon", { type: "warning", message: "Update it before June 1." });
      await server.publish({ user_id: user, event: "reel_upload_progress", data: { reelId: "summer-trip", progress: 60, status: "processing" } });
      await page.getByTestId("toast-promise").click();
      await expect(page.locator(".sse-toast")).toHaveCount(4);
      await page.evaluate(() => window.scrollTo(0, 0));
      const path = process.env.SCREENSHOTS
        ? `../docs/screenshot-${name}-${scheme}.png`
        : testInfo.outputPath(`screenshot-${name}-${scheme}.png`);
      await page.screenshot({ path });
    });
  }
}
