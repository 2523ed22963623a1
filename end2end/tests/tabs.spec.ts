// One stream per browser: tabs of one user share the leader's connection, take over
// without loss, and dismiss toasts together; logging out ends the stream for good.
import { test, expect, signIn, openLive, Server } from "./fixtures";
import type { Page, BrowserContext } from "@playwright/test";

async function clients(server: Server): Promise<number> {
  return (await (await fetch(server.url("/api/stats"))).json()).clients;
}

async function openTabs(context: BrowserContext, server: Server, n: number, query = "?auto=false"): Promise<Page[]> {
  const pages: Page[] = [];
  for (let i = 0; i < n; i++) {
    const page = await context.newPage();
    await openLive(page, server, query);
    pages.push(page);
  }
  return pages;
}

async function leaderOf(pages: Page[]): Promise<Page> {
  await expect
    .poll(async () => {
      const flags = await Promise.all(pages.map((p) => p.locator(".status").getAttribute("data-leader")));
      return flags.filter((f) => f === "true").length;
    })
    .toBe(1);
  for (const page of pages) {
    if ((await page.locator(".status").getAttribute("data-leader")) === "true") return page;
  }
  throw new Error("no leader");
}

test("three tabs of one user share one server connection and each shows every toast once", async ({ context, server }) => {
  await signIn(context, server, "three-tabs");
  const pages = await openTabs(context, server, 3);
  await leaderOf(pages);
  await expect.poll(() => clients(server)).toBe(1);
  for (const n of [1, 2, 3]) await server.notify("three-tabs", `Shared ${n}`);
  for (const page of pages) {
    for (const n of [1, 2, 3]) {
      await expect(page.locator(".sse-toast", { hasText: `Shared ${n}` })).toHaveCount(1);
    }
    await expect(page.locator(".status")).toHaveAttribute("data-status", "open");
  }
  expect(await clients(server)).toBe(1);
});

test("closing the leader twice in a row loses nothing and shows nothing twice", async ({ context, server }) => {
  await signIn(context, server, "relay");
  const pages = await openTabs(context, server, 3);
  await server.notify("relay", "Before");
  for (let round = 1; round <= 2; round++) {
    const leader = await leaderOf(pages);
    pages.splice(pages.indexOf(leader), 1);
    await leader.close();
    // Sent while the next tab takes over: it must come through the resume.
    await server.notify("relay", `During takeover ${round}`);
    await leaderOf(pages);
  }
  await server.notify("relay", "After");
  const [last] = pages;
  for (const title of ["Before", "During takeover 1", "During takeover 2", "After"]) {
    await expect(last.locator(".sse-toast", { hasText: title })).toHaveCount(1);
  }
  await expect.poll(() => clients(server)).toBe(1);
});

test("an event published the moment the leader closes reaches every remaining tab", async ({ context, server }) => {
  // `demo.ping` has no offline delivery, and nothing waits for the next leader: only
  // resuming from the stream's opening id (which the old leader saw, and its followers
  // must have heard) brings it.
  await signIn(context, server, "handover");
  const pages = await openTabs(context, server, 3);
  for (let round = 1; round <= 2; round++) {
    const leader = await leaderOf(pages);
    pages.splice(pages.indexOf(leader), 1);
    await leader.close();
    const marker = `handed-over-${round}`;
    const { status, json } = await server.publish({ user_id: "handover", event: "demo.ping", data: { marker } });
    expect(status, JSON.stringify(json)).toBe(202);
    for (const page of pages) {
      await expect(page.getByTestId("event-log").locator("li", { hasText: marker })).toHaveCount(1);
    }
  }
});

test("tabs of two users in one browser never hear each other's events", async ({ context, server }) => {
  // The hook is not told who is signed in (`user_hint=none`): the tabs must tell the users
  // apart by the identity the server confirmed. The sign-in cookie is the whole context's,
  // so the first tab's stream stays user A's while the second opens as B.
  const query = "?auto=false&user_hint=none";
  await signIn(context, server, "tab-user-a");
  const [a] = await openTabs(context, server, 1, query);
  await signIn(context, server, "tab-user-b");
  const [b] = await openTabs(context, server, 1, query);
  await expect(a.getByTestId("user")).toHaveText("tab-user-a");
  await expect(b.getByTestId("user")).toHaveText("tab-user-b");
  for (const [to, other] of [[a, b], [b, a]] as const) {
    const user = await to.getByTestId("user").innerText();
    await server.notify(user, `Only for ${user}`);
    await expect(to.locator(".sse-toast", { hasText: `Only for ${user}` })).toHaveCount(1);
    // A relay would have passed it on by now.
    await other.waitForTimeout(1_000);
    await expect(other.locator(".sse-toast", { hasText: `Only for ${user}` })).toHaveCount(0);
  }
  // Each tab leads its own user's stream.
  for (const page of [a, b]) await expect(page.locator(".status")).toHaveAttribute("data-leader", "true");
  expect(await clients(server)).toBe(2);
});

test("a toast dismissed in one tab is dismissed in every tab", async ({ context, server }) => {
  await signIn(context, server, "dismisser");
  const [one, two] = await openTabs(context, server, 2);
  await server.notify("dismisser", "Seen everywhere");
  for (const page of [one, two]) {
    await expect(page.locator(".sse-toast", { hasText: "Seen everywhere" })).toBeVisible();
  }
  await one
    .locator(".sse-toast", { hasText: "Seen everywhere" })
    .getByRole("button", { name: "Dismiss notification" })
    .click();
  await expect(two.locator(".sse-toast", { hasText: "Seen everywhere" })).toHaveCount(0);
});

test("signing out ends the stream, which then stays closed", async ({ page, context, server }) => {
  await signIn(context, server, "leaver");
  await openLive(page, server, "?auto=false");
  await page.getByTestId("sign-out").click();
  await expect(page.locator(".status")).toHaveAttribute("data-status", "closed");
  await expect(page.getByTestId("user")).toHaveCount(0);
  await page.waitForTimeout(3_000);
  await expect(page.locator(".status")).toHaveAttribute("data-status", "closed");
  expect(await clients(server)).toBe(0);
});
