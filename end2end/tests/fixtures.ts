// Starts the real sse-notify binary per test on a free port, with helpers to sign in,
// publish through POST /api/events, and check the page for console errors.
import { test as base, expect, Page, BrowserContext } from "@playwright/test";
import { spawn, ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";

const ROOT = path.resolve(__dirname, "..", "..");
export const PUBLISH_KEY = "e2e-publish-key-0123";

/** The newest build of `name` (release or debug), or `override` when set. */
function binary(name: string, override?: string): string {
  if (override) return override;
  const candidates = ["release", "debug"]
    .map((p) => path.join(ROOT, "target", p, name))
    .filter((p) => fs.existsSync(p));
  if (candidates.length === 0) throw new Error(`no ${name} binary: run \`cargo leptos build\` first`);
  return candidates.sort((a, b) => fs.statSync(b).mtimeMs - fs.statSync(a).mtimeMs)[0];
}

/** Whether nothing listens on `port` on loopback right now. */
function bindable(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.once("error", () => resolve(false));
    srv.listen(port, "127.0.0.1", () => srv.close(() => resolve(true)));
  });
}

/**
 * A free port below Linux's ephemeral range (32768-60999), picked at random: the kernel
 * never hands one of these to the browser's outgoing connections between the moment it is
 * picked and the moment the server binds it.
 */
export async function freePort(): Promise<number> {
  for (;;) {
    const port = 20_000 + Math.floor(Math.random() * 12_000);
    if (await bindable(port)) return port;
  }
}

/** One running sse-notify server (the demo binary, or the example host app). */
export class Server {
  private child?: ChildProcess;
  private constructor(
    public readonly port: number,
    private readonly env: Record<string, string>,
    private readonly bin: string,
    private readonly siteRoot: string,
  ) {}

  static async start(env: Record<string, string> = {}): Promise<Server> {
    const bin = binary("sse-notify", process.env.SSE_NOTIFY_BIN);
    // SSE_NOTIFY_SITE_ROOT: the site files of another build (the container image's).
    const site = process.env.SSE_NOTIFY_SITE_ROOT ?? path.join(ROOT, "target", "site");
    return Server.startOnFreePort({ SSE_DEMO: "1", ...env }, bin, site);
  }

  /** The example host app (examples/host), with sse-notify under /notify. */
  static async startHost(env: Record<string, string> = {}): Promise<Server> {
    const bin = binary("sse-notify-host-example", process.env.HOST_BIN);
    return Server.startOnFreePort(env, bin, path.join(ROOT, "target", "site-host"));
  }

  /** Starts on a free port, and on another if something took that one meanwhile. */
  private static async startOnFreePort(env: Record<string, string>, bin: string, siteRoot: string): Promise<Server> {
    let failure: unknown;
    for (let attempt = 0; attempt < 3; attempt++) {
      const server = new Server(await freePort(), env, bin, siteRoot);
      try {
        await server.start();
        return server;
      } catch (e) {
        failure = e;
        await server.stop();
      }
    }
    throw failure;
  }

  url(p = "/"): string {
    return `http://127.0.0.1:${this.port}${p}`;
  }

  /** `SSE_INBOX_URL: "sqlite:temp"` asks for a fresh SQLite file of this server's own. */
  private inboxFile?: string;

  async start(): Promise<void> {
    if (this.env.SSE_INBOX_URL === "sqlite:temp") {
      this.inboxFile ??= path.join(os.tmpdir(), `sse-e2e-inbox-${this.port}-${Date.now()}.db`);
    }
    const inbox = this.inboxFile ? { SSE_INBOX_URL: `sqlite://${this.inboxFile}` } : {};
    this.child = spawn(this.bin, [], {
      cwd: ROOT,
      env: {
        ...process.env,
        LEPTOS_SITE_ADDR: `127.0.0.1:${this.port}`,
        LEPTOS_SITE_ROOT: this.siteRoot,
        SSE_PUBLISH_KEY: PUBLISH_KEY,
        SSE_JWT_SECRET: "e2e-secret-0123456789abcdef",
        SSE_HEARTBEAT_INTERVAL_MS: "2000",
        SSE_RETRY_MS: "500",
        RUST_LOG: "warn",
        ...this.env,
        ...inbox,
      },
      stdio: ["ignore", "inherit", "inherit"],
    });
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      if (this.child.exitCode !== null) throw new Error(`server exited with ${this.child.exitCode}`);
      try {
        const res = await fetch(this.url("/healthz"));
        if (res.ok) return;
      } catch {
        /* not listening yet */
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error("server did not become healthy within 30 s");
  }

  async stop(): Promise<void> {
    const child = this.child;
    if (!child || child.exitCode !== null) return;
    const exited = new Promise((r) => child.once("exit", r));
    child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    await exited;
    clearTimeout(timer);
  }

  async restart(): Promise<void> {
    await this.stop();
    await this.start();
  }

  /** POST /api/events with the publish key; returns the status and JSON body. */
  async publish(body: unknown): Promise<{ status: number; json: any }> {
    const res = await fetch(this.url("/api/events"), {
      method: "POST",
      headers: { authorization: `Bearer ${PUBLISH_KEY}`, "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    return { status: res.status, json: await res.json() };
  }

  async notify(user: string, title: string, extra: Record<string, unknown> = {}): Promise<void> {
    const { status, json } = await this.publish({
      user_id: user,
      event: "notification",
      data: { title, message: `message for ${user}`, ...extra },
    });
    expect(status, JSON.stringify(json)).toBe(202);
  }
}

/** Signs the browser context in as `user` (the context's cookie jar gets the session). */
export async function signIn(context: BrowserContext, server: Server, user: string): Promise<void> {
  const res = await context.request.post(server.url("/api/session"), { data: { user_id: user } });
  expect(res.status()).toBe(200);
}

/** Opens a page of the demo and waits until it is hydrated and its stream is live. */
export async function openLive(page: Page, server: Server, query = ""): Promise<void> {
  await page.goto(server.url(`/${query}`));
  await expect(page.locator('[data-hydrated="true"]')).toBeVisible();
  await expect(page.locator('.status[data-status="open"]')).toBeVisible();
}

/** Console errors and hydration warnings seen by a page. */
export function watchConsole(page: Page): string[] {
  const problems: string[] = [];
  page.on("console", (msg) => {
    const text = msg.text();
    if (msg.type() === "error" || /hydrat/i.test(text)) problems.push(`${msg.type()}: ${text}`);
  });
  page.on("pageerror", (err) => problems.push(`pageerror: ${err.message}`));
  return problems;
}

type Fixtures = { server: Server; consoleProblems: string[]; serverEnv: Record<string, string> };

export const test = base.extend<Fixtures>({
  // The test's pages close before its server stops, so a page never logs the refused
  // reconnects of a server that went away after the test was over.
  // Extra variables of the test's server (`test.use({ serverEnv: {...} })`).
  serverEnv: [{}, { option: true }],
  server: async ({ context, serverEnv }, use) => {
    const server = await Server.start(serverEnv);
    await use(server);
    await context.close();
    await server.stop();
  },
  // Every test fails on a console error or hydration warning, unless it clears the list
  // on purpose (a test that kills the server expects connection errors).
  consoleProblems: [
    async ({ page }, use) => {
      const problems = watchConsole(page);
      await use(problems);
      expect(problems, "console errors or hydration warnings").toEqual([]);
    },
    { auto: true },
  ],
});

export { expect };
