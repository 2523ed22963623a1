// What a person checks about the toasts: they appear, link, leave, wait their turn,
// update in place, stay private, survive a restart, and sit in the chosen corner.
import { test, expect, signIn, openLive, Server } from "./fixtures";

test("a notification from the server appears as a toast with its action link", async ({ page, context, server }, testInfo) => {
  await signIn(context, server, "ann");
  await openLive(page, server, "?auto=false");
  await server.notify("ann", "Payment received", { type: "success", actionUrl: "/billing/42" });
  const toast = page.locator(".sse-toast", { hasText: "Payment received" });
  await expect(toast).toBeVisible();
  await expect(toast).toHaveAttribute("data-kind", "success");
  await expect(toast.getByRole("link", { name: "Open" })).toHaveAttribute("href", "/billing/42");
  // Announced politely to screen readers.
  await expect(page.locator('[role="status"][aria-live="polite"]').locator(".sse-toast")).toHaveCount(1);
  await page.screenshot({ path: testInfo.outputPath("notification-toast.png") });
});

test("an error notification is announced assertively", async ({ page, context, server }) => {
  await signIn(context, server, "erin");
  await openLive(page, server, "?auto=false");
  await server.notify("erin", "Card declined", { type: "error" });
  await expect(page.locator('[role="alert"][aria-live="assertive"] .sse-toast', { hasText: "Card declined" })).toBeVisible();
});

test("toasts dismiss themselves after dismiss_delay, and hovering pauses the timer", async ({ page, context, server }) => {
  await signIn(context, server, "dan");
  await openLive(page, server, "?dismiss=1500");
  await server.notify("dan", "Short lived");
  const shortLived = page.locator(".sse-toast", { hasText: "Short lived" });
  await expect(shortLived).toBeVisible();
  await expect(shortLived).toBeHidden({ timeout: 6_000 });

  await server.notify("dan", "Hovered");
  const hovered = page.locator(".sse-toast", { hasText: "Hovered" });
  await hovered.hover();
  await page.waitForTimeout(3_000); // twice the delay: it would be gone without the pause
  await expect(hovered).toBeVisible();
  await page.mouse.move(5, 500);
  await expect(hovered).toBeHidden({ timeout: 6_000 });
});

test("the close button and Escape dismiss toasts", async ({ page, context, server }) => {
  await signIn(context, server, "cleo");
  await openLive(page, server, "?auto=false");
  await server.notify("cleo", "Close me");
  await server.notify("cleo", "Escape me");
  const closeMe = page.locator(".sse-toast", { hasText: "Close me" });
  const escapeMe = page.locator(".sse-toast", { hasText: "Escape me" });
  await expect(escapeMe).toBeVisible();
  await closeMe.getByRole("button", { name: "Dismiss notification" }).click();
  await expect(closeMe).toBeHidden();
  await escapeMe.focus();
  await page.keyboard.press("Escape");
  await expect(escapeMe).toBeHidden();
});

test("with 8 events and max 3, three show and the rest follow, none lost", async ({ page, context, server }, testInfo) => {
  await signIn(context, server, "max");
  await openLive(page, server, "?max=3&auto=false");
  const events = Array.from({ length: 8 }, (_, i) => ({
    user_id: "max",
    event: "notification",
    data: { title: `Queued ${i + 1}`, message: "m" },
  }));
  expect((await server.publish(events)).status).toBe(202);
  const toasts = page.locator(".sse-toasts .sse-toast");
  await expect(toasts).toHaveCount(3);
  await page.screenshot({ path: testInfo.outputPath("max-three.png") });
  const seen: string[] = [];
  for (let i = 0; i < 8; i++) {
    const first = toasts.first();
    const title = (await first.locator(".sse-toast__title").textContent()) ?? "";
    seen.push(title);
    await first.getByRole("button", { name: "Dismiss notification" }).click();
    await expect(page.locator(".sse-toast", { hasText: title })).toHaveCount(0);
  }
  expect(seen).toEqual(events.map((e) => e.data.title));
  await expect(toasts).toHaveCount(0);
});

test("a reel upload shows one toast whose bar advances and turns into ready", async ({ page, context, server }, testInfo) => {
  await signIn(context, server, "rita");
  await openLive(page, server, "?auto=false");
  await page.getByTestId("send-reel").click();
  const bar = page.locator(".sse-toast .sse-toast__progress");
  await expect(bar).toBeVisible();
  const first = Number(await bar.getAttribute("aria-valuenow"));
  await expect
    .poll(async () => Number((await bar.getAttribute("aria-valuenow")) ?? 0))
    .toBeGreaterThan(first);
  await page.screenshot({ path: testInfo.outputPath("reel-progress.png") });
  // One toast throughout, updated in place.
  await expect(page.locator(".sse-toasts .sse-toast")).toHaveCount(1);
  const ready = page.locator(".sse-toast", { hasText: "Reel ready" });
  await expect(ready).toBeVisible({ timeout: 15_000 });
  await expect(ready.getByRole("link", { name: "Watch" })).toHaveAttribute("href", /^\/reels\/reel-/);
  await expect(page.locator(".sse-toasts .sse-toast")).toHaveCount(1);
});

test("a system alert reaches two users; one user's notification does not reach the other", async ({ browser, server }) => {
  const contexts = await Promise.all([browser.newContext(), browser.newContext()]);
  const [alicePage, bobPage] = await Promise.all(contexts.map((c) => c.newPage()));
  await signIn(contexts[0], server, "alice");
  await signIn(contexts[1], server, "bob");
  await openLive(alicePage, server, "?auto=false");
  await openLive(bobPage, server, "?auto=false");

  await server.notify("alice", "For alice only");
  await expect(alicePage.locator(".sse-toast", { hasText: "For alice only" })).toBeVisible();

  const { status } = await server.publish({ broadcast: true, event: "system_alert", data: { message: "Deploy at noon", type: "maintenance" } });
  expect(status).toBe(202);
  for (const page of [alicePage, bobPage]) {
    await expect(page.locator(".sse-banners .sse-toast", { hasText: "Deploy at noon" })).toBeVisible();
  }
  await expect(bobPage.locator(".sse-toast", { hasText: "For alice only" })).toHaveCount(0);
  await expect(bobPage.getByTestId("event-log")).not.toContainText("For alice only");
  await Promise.all(contexts.map((c) => c.close()));
});

test("after the server restarts, the page reconnects by itself and shows what was sent while it was offline", async ({ page, context, server, consoleProblems }) => {
  await signIn(context, server, "phoenix");
  await openLive(page, server, "?auto=false");
  await server.notify("phoenix", "Before restart");
  await expect(page.locator(".sse-toast", { hasText: "Before restart" })).toBeVisible();

  // Keep the page offline until the event has been sent: its reconnects fail until then,
  // so the toast can only come from the replay by Last-Event-ID.
  let blocked = 0;
  await page.route("**/api/sse**", (route) => {
    blocked += 1;
    return route.abort();
  });
  await server.restart();
  await expect(page.locator('.status[data-status="open"]')).toHaveCount(0);
  await expect.poll(() => blocked, { timeout: 15_000 }).toBeGreaterThan(0);
  await server.notify("phoenix", "While away");
  await page.unroute("**/api/sse**");

  await expect(page.locator(".sse-toast", { hasText: "While away" })).toBeVisible({ timeout: 20_000 });
  await expect(page.locator('.status[data-status="open"]')).toBeVisible();
  // The resume id is from the server's previous run: the hook reports the resync.
  await expect(page.locator(".status")).toHaveAttribute("data-error", "resync");
  await server.notify("phoenix", "After reconnect");
  await expect(page.locator(".sse-toast", { hasText: "After reconnect" })).toBeVisible();
  // Only the refused and the aborted stream requests may log; nothing else.
  const unexpected = consoleProblems.filter((p) => !/^error: Failed to load resource: net::ERR_(CONNECTION_REFUSED|FAILED)$/.test(p));
  expect(unexpected).toEqual([]);
  consoleProblems.length = 0;
});

for (const position of ["top-right", "top-left", "bottom-right", "bottom-left"]) {
  test(`position ${position} places the stack in its corner`, async ({ page, context, server }) => {
    await signIn(context, server, `pos-${position}`);
    await page.setViewportSize({ width: 1200, height: 800 });
    await openLive(page, server, `?position=${position}&auto=false`);
    await server.notify(`pos-${position}`, `At ${position}`);
    const toast = page.locator(".sse-toast", { hasText: `At ${position}` });
    await expect(toast).toBeVisible();
    const box = (await toast.boundingBox())!;
    const [vertical, horizontal] = position.split("-");
    if (vertical === "top") expect(box.y).toBeLessThan(100);
    else expect(box.y + box.height).toBeGreaterThan(700);
    if (horizontal === "left") expect(box.x).toBeLessThan(100);
    else expect(box.x + box.width).toBeGreaterThan(1100);
  });
}
