// The use_sse hook against the real server: the filter it sends, replacement by a newer
// connection, and the stall watchdog.
import type { Page } from "@playwright/test";
import { test, expect, signIn, openLive, Server } from "./fixtures";

test("the hook sends its events= filter and receives the custom events it names", async ({ page, context, server }) => {
  await signIn(context, server, "filter");
  const streamRequest = page.waitForRequest(/\/api\/sse\?/);
  await openLive(page, server);
  const url = new URL((await streamRequest).url());
  const names = (url.searchParams.get("events") ?? "").split(",");
  expect(names).toEqual(expect.arrayContaining(["notification", "reel_ready", "system_alert", "demo.ping"]));
  expect((await server.publish({ user_id: "filter", event: "demo.ping", data: { n: 1 } })).status).toBe(202);
  await expect(page.getByTestId("event-log")).toContainText("demo.ping");
});

test("a connection replaced by a newer one of the same user stays closed", async ({ browser }) => {
  const server = await Server.start({ SSE_MAX_CLIENTS_PER_USER: "1" });
  try {
    const contexts = await Promise.all([browser.newContext(), browser.newContext()]);
    const [older, newer] = await Promise.all(contexts.map((c) => c.newPage()));
    for (const context of contexts) await signIn(context, server, "twin");
    await openLive(older, server, "?auto=false");
    await openLive(newer, server, "?auto=false");

    const status = older.locator(".status");
    await expect(status).toHaveAttribute("data-error", "replaced");
    await expect(status).toHaveAttribute("data-status", "closed");
    // It does not come back on its own (which would replace the newer tab in turn).
    await older.waitForTimeout(3_000);
    await expect(status).toHaveAttribute("data-status", "closed");
    await server.notify("twin", "For the newer tab");
    await expect(newer.locator(".sse-toast", { hasText: "For the newer tab" })).toBeVisible();
    await expect(older.locator(".sse-toast", { hasText: "For the newer tab" })).toHaveCount(0);
    const stats = await (await fetch(server.url("/api/stats"))).json();
    expect(stats.clients).toBe(1);
    await Promise.all(contexts.map((c) => c.close()));
  } finally {
    await server.stop();
  }
});

test("a stream silent for longer than the stall timeout is reported and reopened", async ({ browser }) => {
  // Heartbeats once a minute, a stall timeout of 1.5 s: the watchdog must fire.
  const server = await Server.start({ SSE_HEARTBEAT_INTERVAL_MS: "60000" });
  try {
    const context = await browser.newContext();
    const page = await context.newPage();
    await signIn(context, server, "quiet");
    await openLive(page, server, "?auto=false&stall=1500");
    await expect(page.locator(".status")).toHaveAttribute("data-error", "stalled", { timeout: 10_000 });
    await expect(page.locator('.status[data-status="open"]')).toBeVisible();
    await server.notify("quiet", "Still delivered");
    await expect(page.locator(".sse-toast", { hasText: "Still delivered" })).toBeVisible();
    await context.close();
  } finally {
    await server.stop();
  }
});

/** Opens the short-session page (tokens from token_url only) and records the token and
 * stream requests it makes. */
async function openShortSession(page: Page, server: Server) {
  const tokens: string[] = [];
  const streams: string[] = [];
  page.on("request", (r) => {
    if (r.url().includes("/api/demo/token")) tokens.push(r.url());
    // GET only: the HEAD probe that tells a tab its identity tag opens no stream.
    if (r.url().includes("/api/sse") && r.method() === "GET") streams.push(r.url());
  });
  await page.goto(server.url("/short-session"));
  await expect(page.locator('[data-hydrated="true"]')).toBeVisible();
  return { tokens, streams };
}

test("without a session the first token is refused: the hook stops as unauthorized and does not retry", async ({ page, server, consoleProblems }) => {
  const { tokens, streams } = await openShortSession(page, server);
  const badge = page.locator('.status[data-error="unauthorized"]');
  await expect(badge).toHaveText(/Not signed in/);
  await page.waitForTimeout(3_000);
  expect(tokens.length).toBe(1);
  expect(streams.length).toBe(0);
  // The refused token request is the only thing the page logs.
  expect(consoleProblems).toEqual([expect.stringMatching(/status of 401/)]);
  consoleProblems.length = 0;
});

test("a token endpoint that does not answer is given up on after 10 s and asked again", async ({ page, context, server, consoleProblems }) => {
  test.setTimeout(45_000);
  await signIn(context, server, "slow-token");
  let asked = 0;
  await page.route("**/api/demo/token**", async (route) => {
    asked += 1;
    // The first request is never answered: only the hook's own timeout can end it.
    if (asked > 1) await route.continue();
  });
  await openShortSession(page, server);
  await expect(page.locator('.status[data-status="open"]')).toBeVisible({ timeout: 25_000 });
  expect(asked).toBe(2);
  // The aborted request may log; nothing else may.
  expect(consoleProblems.filter((p) => !/ERR_ABORTED|abort/i.test(p))).toEqual([]);
  consoleProblems.length = 0;
});

test("a stream whose token expires fetches a fresh one from token_url and keeps receiving", async ({ page, context, server }) => {
  await signIn(context, server, "short");
  const { tokens, streams } = await openShortSession(page, server);
  await expect(page.locator('.status[data-status="open"]')).toBeVisible();
  // The first token comes from token_url as the page opens; the 3 s token then ends the
  // stream (session_ended: expired) and the hook fetches a fresh one.
  await expect.poll(() => tokens.length, { timeout: 15_000 }).toBeGreaterThan(1);
  // Every stream carried a token (none rode on the session cookie alone).
  await expect.poll(() => streams.length, { timeout: 15_000 }).toBeGreaterThan(1);
  expect(streams.every((url) => new URL(url).searchParams.get("token"))).toBe(true);
  await expect(page.locator('.status[data-status="open"]')).toBeVisible();
  await server.notify("short", "After a fresh token");
  await expect(page.locator(".sse-toast", { hasText: "After a fresh token" })).toBeVisible();
});

/** The user a stream request's `?token=` names (the JWT's `sub`). */
function tokenUser(streamUrl: string): string | undefined {
  const token = new URL(streamUrl).searchParams.get("token");
  if (!token) return undefined;
  return JSON.parse(Buffer.from(token.split(".")[1], "base64url").toString()).sub;
}

test("a token fetched for one user is dropped when another signs in on the same page", async ({ page, context, server }) => {
  await signIn(context, server, "first-user");
  const streams: string[] = [];
  page.on("request", (r) => {
    // GET only: the HEAD probe that tells a tab its identity tag opens no stream.
    if (r.url().includes("/api/sse") && r.method() === "GET") streams.push(r.url());
  });
  // Tokens that outlive the test, so the first user's would still be accepted.
  await openLive(page, server, "?auto=false&token_ttl=600");
  await expect(page.locator('.status[data-status="open"]')).toBeVisible();
  expect(streams.map(tokenUser)).toEqual(["first-user"]);

  await page.getByTestId("sign-out").click();
  await expect(page.locator(".status")).toHaveAttribute("data-status", "closed");
  await page.locator("#user_id").fill("second-user");
  await page.getByRole("button", { name: "Sign in" }).click();
  await expect(page.getByTestId("user")).toHaveText("second-user");
  await expect(page.locator('.status[data-status="open"]')).toBeVisible();
  await expect.poll(() => streams.length).toBeGreaterThan(1);
  const after = streams.slice(1).map(tokenUser);
  expect(after).toEqual(after.map(() => "second-user"));

  await server.notify("first-user", "For the first user");
  await server.notify("second-user", "For the second user");
  await expect(page.locator(".sse-toast", { hasText: "For the second user" })).toBeVisible();
  await expect(page.locator(".sse-toast", { hasText: "For the first user" })).toHaveCount(0);
});
