// The operators' dashboard of the standalone server (no demo): behind the publish key, it
// lists every instance on the Redis live, and an instance that stops leaves the table.
import { test, expect, Server, PUBLISH_KEY } from "./fixtures";
import { Redis } from "./deployment";

test("the operators' dashboard shows every instance live, behind the publish key", async ({ page, consoleProblems }, testInfo) => {
  test.setTimeout(60_000);
  const redis = await Redis.start();
  const production = { SSE_DEMO: "0", REDIS_URL: redis.url };
  const a = await Server.start(production);
  const b = await Server.start(production);
  try {
    await page.goto(a.url("/dashboard"));
    const key = page.getByLabel("Publish key");
    await key.fill("not-the-key");
    await page.getByRole("button", { name: "Sign in" }).click();
    await expect(page.getByRole("alert")).toContainText("not this server's publish key");
    // The refused sign-in is a 403, which the browser logs as a failed load: expected here.
    expect(consoleProblems).toEqual(["error: Failed to load resource: the server responded with a status of 403 (Forbidden)"]);
    consoleProblems.length = 0;
    await key.fill(PUBLISH_KEY);
    await page.getByRole("button", { name: "Sign in" }).click();

    const rows = page.locator("#instance-table tbody tr");
    await expect(page.locator("#live")).toContainText("Live");
    await expect(rows).toHaveCount(2);
    await expect(page.locator("#instances")).toHaveText("2");
    // Both rows filled in by the live script, from each instance's own figures.
    await expect(page.locator("#instance-table td[data-k='broker']")).toHaveText(["redis (healthy)", "redis (healthy)"]);
    await expect(page.locator("#instance-table td[data-k='published']")).toHaveText([/^\d+$/, /^\d+$/]);

    for (const scheme of ["light", "dark"] as const) {
      for (const [name, width, height] of [
        ["desktop", 1280, 800],
        ["mobile", 390, 844],
      ] as const) {
        await page.emulateMedia({ colorScheme: scheme });
        await page.setViewportSize({ width, height });
        const scroll = await page.evaluate(() => document.documentElement.scrollWidth);
        expect(scroll, `${name}: no sideways scroll`).toBeLessThanOrEqual(width);
        await page.screenshot({ path: testInfo.outputPath(`ops-${name}-${scheme}.png`) });
      }
    }

    await b.stop();
    await expect(rows).toHaveCount(1);
    await expect(page.locator("#instances")).toHaveText("1");

    await page.getByRole("button", { name: "Sign out" }).click();
    await expect(page.getByLabel("Publish key")).toBeVisible();
  } finally {
    await b.stop();
    await a.stop();
    await redis.stop();
  }
});
