// The whole chain: SSR renders, the WASM hydrates, and events streamed by the server reach the page.
import { test, expect, signIn, openLive } from "./fixtures";

test("the page is server-rendered before any WASM runs", async ({ server }) => {
  const html = await (await fetch(server.url("/"))).text();
  expect(html).toContain("Live notifications for Leptos");
  expect(html).toContain('aria-label="Notifications"');
  // The hydration scripts are referenced, so the browser will load the WASM.
  expect(html).toMatch(/sse-notify(\.[a-z0-9]+)?\.js/);
});

test("hydrates and shows events streamed from the server", async ({ page, context, server }) => {
  await signIn(context, server, "smoke-user");
  await openLive(page, server);
  await expect(page.getByTestId("user")).toHaveText("smoke-user");
  for (const n of [1, 2, 3]) await server.notify("smoke-user", `Smoke ${n}`);
  for (const n of [1, 2, 3]) {
    await expect(page.locator(".sse-toast", { hasText: `Smoke ${n}` })).toBeVisible();
  }
  // The raw log shows the three events with their ids.
  await expect(page.getByTestId("event-log").locator("li")).toHaveCount(3);
});

test("a click handled by the WASM sends an event through a server function", async ({ page, context, server }) => {
  await signIn(context, server, "clicker");
  await openLive(page, server);
  await page.getByTestId("title").fill("From the button");
  await page.getByTestId("send-notification").click();
  await expect(page.locator(".sse-toast", { hasText: "From the button" })).toBeVisible();
  await expect(page.getByTestId("send-result")).toContainText("Sent");
});
