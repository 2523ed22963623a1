// When SSE cannot get through: a buffering proxy in front of the real server (page, sign-in
// and stream all through it) makes the hook detect it, fall back to WebSocket without
// losing what the proxy held, and return to SSE once the proxy is out of the way.
import { test, expect, PUBLISH_KEY } from "./fixtures";
import { BufferingProxy } from "./proxy";

test("behind a buffering proxy the hook falls back to WebSocket, loses nothing, and returns to SSE", async ({ page, context, server }) => {
  test.setTimeout(90_000);
  const proxy = await BufferingProxy.start(server.port);
  try {
    const signedIn = await context.request.post(proxy.url("/api/session"), { data: { user_id: "behind" } });
    expect(signedIn.status()).toBe(200);
    const sockets: string[] = [];
    page.on("websocket", (ws) => sockets.push(ws.url()));
    const opened = Date.now();
    await page.goto(proxy.url("/?auto=false&sse_retry=5000"));
    await expect(page.locator('[data-hydrated="true"]')).toBeVisible();
    const status = page.locator(".status");
    // The SSE response opens (the proxy passes its headers)...
    await expect(status).toHaveAttribute("data-status", "open");
    await expect(status).toHaveAttribute("data-transport", "sse");
    // ...but what is sent now is held back by the proxy.
    await server.notify("behind", "Sent while held back");
    await page.waitForTimeout(1_000);
    await expect(page.locator(".sse-toast", { hasText: "Sent while held back" })).toHaveCount(0);

    // Within 5 s of opening the hook finds the stream buffered and goes on over WebSocket,
    // where what the proxy held arrives after all.
    await expect(status).toHaveAttribute("data-transport", "websocket", { timeout: 8_000 });
    await expect(status).toHaveAttribute("data-status", "open");
    expect(sockets.some((u) => u.includes("/api/ws") && u.includes("fallback=buffered"))).toBe(true);
    await expect(page.locator(".sse-toast", { hasText: "Sent while held back" })).toBeVisible();

    // Once the page has been open 8 s, each toast follows its publish within 2 s.
    await page.waitForTimeout(Math.max(0, opened + 8_000 - Date.now()));
    for (const title of ["First after the switch", "Second after the switch"]) {
      await server.notify("behind", title);
      await expect(page.locator(".sse-toast", { hasText: title })).toBeVisible({ timeout: 2_000 });
    }
    // The probes of SSE (every 5 s here) find it still held back: the hook stays put.
    await page.waitForTimeout(6_000);
    await expect(status).toHaveAttribute("data-transport", "websocket");

    // The server counted the client that came because of buffering.
    const metrics = await (await fetch(server.url("/metrics"), { headers: { authorization: `Bearer ${PUBLISH_KEY}` } })).text();
    expect(metrics).toMatch(/^sse_buffered_clients_total [1-9]/m);

    // The proxy is removed: the next probe gets through and the hook returns to SSE,
    // resuming by last id (nothing twice, nothing missed).
    proxy.buffering = false;
    await expect(status).toHaveAttribute("data-transport", "sse", { timeout: 15_000 });
    await expect(status).toHaveAttribute("data-status", "open");
    await server.notify("behind", "Back on SSE");
    await expect(page.locator(".sse-toast", { hasText: "Back on SSE" })).toBeVisible({ timeout: 2_000 });
    for (const title of ["Sent while held back", "First after the switch", "Second after the switch", "Back on SSE"]) {
      await expect(page.locator(".sse-toast", { hasText: title })).toHaveCount(1);
    }
  } finally {
    // The page goes first, so it never sees the proxy cut its streams.
    await page.close();
    await proxy.stop();
  }
});

test("transport=websocket forces the WebSocket stream", async ({ page, context, server }) => {
  const signedIn = await context.request.post(server.url("/api/session"), { data: { user_id: "ws-only" } });
  expect(signedIn.status()).toBe(200);
  const sseRequests: string[] = [];
  page.on("request", (r) => {
    // GET only: the HEAD probe that tells a tab its identity tag opens no stream.
    if (r.url().includes("/api/sse") && r.method() === "GET") sseRequests.push(r.url());
  });
  await page.goto(server.url("/?transport=websocket"));
  await expect(page.locator('[data-hydrated="true"]')).toBeVisible();
  const status = page.locator(".status");
  await expect(status).toHaveAttribute("data-status", "open");
  await expect(status).toHaveAttribute("data-transport", "websocket");
  await expect(status).toContainText("over WebSocket");
  await server.notify("ws-only", "Over the socket");
  await expect(page.locator(".sse-toast", { hasText: "Over the socket" })).toBeVisible();
  expect(sseRequests).toEqual([]);
});
