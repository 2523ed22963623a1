// The deployment an operator copies from deploy/: nginx with the shipped site in front of two
// instances on one Redis. Toasts published on either instance arrive through it, over SSE
// and over the WebSocket fallback, and a stream whose instance stops goes on through the
// other without loss.
import { test, expect, watchConsole, Server, PUBLISH_KEY } from "./fixtures";
import { Deployment } from "./deployment";

/** The streams an instance holds now (its own count, not the cluster's). */
async function streamsOn(instance: Server): Promise<number> {
  const res = await fetch(instance.url("/api/stats"), { headers: { authorization: `Bearer ${PUBLISH_KEY}` } });
  return (await res.json()).clients;
}

test("through the shipped nginx site, toasts from either instance reach SSE and WebSocket pages", async ({
  page,
  context,
  browser,
  consoleProblems,
}) => {
  test.setTimeout(90_000);
  const deployment = await Deployment.start();
  const device = await browser.newContext();
  try {
    const { nginx } = deployment;
    const [a, b] = deployment.instances;
    // Everything the browser does goes through nginx: sign-in, page, WASM, stream.
    for (const ctx of [context, device]) {
      const signedIn = await ctx.request.post(nginx.url("/api/session"), { data: { user_id: "proxied" } });
      expect(signedIn.status()).toBe(200);
    }
    // auto=false: toasts stay until dismissed, so the test can count them.
    await page.goto(nginx.url("/?auto=false"));
    await expect(page.locator('[data-hydrated="true"]')).toBeVisible();
    const status = page.locator(".status");
    await expect(status).toHaveAttribute("data-status", "open");
    await expect(status).toHaveAttribute("data-transport", "sse");

    // Another device of the same user, forced onto the WebSocket stream: the upgrade passes
    // the proxy (its own context: tabs of one browser share one stream).
    const wsPage = await device.newPage();
    const wsProblems = watchConsole(wsPage);
    const sockets: string[] = [];
    wsPage.on("websocket", (ws) => sockets.push(ws.url()));
    await wsPage.goto(nginx.url("/?auto=false&transport=websocket"));
    await expect(wsPage.locator('[data-hydrated="true"]')).toBeVisible();
    const wsStatus = wsPage.locator(".status");
    await expect(wsStatus).toHaveAttribute("data-status", "open");
    await expect(wsStatus).toHaveAttribute("data-transport", "websocket");
    expect(sockets.some((u) => u.startsWith(`ws://127.0.0.1:${nginx.port}/api/ws`))).toBe(true);

    // A backend publishes to either instance directly; both pages get both, once.
    await a.notify("proxied", "Published on A");
    await b.notify("proxied", "Published on B");
    for (const p of [page, wsPage]) {
      for (const title of ["Published on A", "Published on B"]) {
        await expect(p.locator(".sse-toast", { hasText: title })).toHaveCount(1);
      }
    }

    // The instance holding a stream stops: its streams reconnect through nginx to the other
    // with their last id, and what is published meanwhile arrives once.
    const held = await Promise.all([a, b].map(streamsOn));
    expect(held[0] + held[1]).toBe(2);
    const [stopped, survivor] = held[0] > 0 ? [a, b] : [b, a];
    await stopped.stop();
    await survivor.notify("proxied", "While one is down");
    for (const p of [page, wsPage]) {
      await expect(p.locator(".sse-toast", { hasText: "While one is down" })).toHaveCount(1, { timeout: 15_000 });
      await expect(p.locator('.status[data-status="open"]')).toBeVisible();
      // Resumed by last id: nothing from before came twice.
      for (const title of ["Published on A", "Published on B"]) {
        await expect(p.locator(".sse-toast", { hasText: title })).toHaveCount(1);
      }
    }
    await expect.poll(() => streamsOn(survivor)).toBe(2);
    expect(wsProblems.filter((p) => !/\/api\/(ws|sse)|ERR_|WebSocket/.test(p))).toEqual([]);
    // The streams cut by the stop are logged by the browser as failed requests: expected here.
    consoleProblems.splice(0, consoleProblems.length, ...consoleProblems.filter((p) => !/\/api\/(ws|sse)|ERR_|WebSocket/.test(p)));
  } finally {
    await page.close();
    await device.close();
    await deployment.stop();
  }
});
