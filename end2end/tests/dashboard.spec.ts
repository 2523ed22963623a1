// The dashboard follows connections and deliveries live over SSE.
import { test, expect, signIn, openLive } from "./fixtures";

test("the dashboard shows live connections and delivered events", async ({ page, context, browser, server }) => {
  const other = await browser.newContext();
  const watcher = await other.newPage();
  await signIn(other, server, "watched");
  await openLive(watcher, server);

  await page.goto(server.url("/dashboard"));
  await expect(page.locator('[data-hydrated="true"]')).toBeVisible();
  await expect(page.getByTestId("clients")).toHaveText("1");
  await server.notify("watched", "count me");
  await expect(page.getByTestId("delivered")).toHaveText("1");
  await expect(page.getByTestId("published")).toHaveText("1");
  await other.close();
  await expect(page.getByTestId("clients")).toHaveText("0");
});
