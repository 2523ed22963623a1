// The shipped deployment, started for real: a redis-server, two sse-notify instances on it,
// and Debian's nginx running deploy/nginx/sse-notify.conf in front of them, all on free ports.
import { spawn, ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { Server, freePort } from "./fixtures";

const ROOT = path.resolve(__dirname, "..", "..");
/** The site file an operator copies; the test changes only its ports. */
export const SITE_FILE = path.join(ROOT, "deploy", "nginx", "sse-notify.conf");
const NGINX = process.env.NGINX_PATH ?? "/usr/sbin/nginx";

/** Waits until `check` resolves true, or fails after `ms` naming `what`. */
async function until(what: string, ms: number, check: () => Promise<boolean>): Promise<void> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await check().catch(() => false)) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${what} did not come up within ${ms} ms`);
}

function answers(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, "127.0.0.1");
    socket.once("connect", () => resolve(socket.end() && true));
    socket.once("error", () => resolve(false));
  });
}

/** Stops a child with SIGTERM (SIGKILL after 10 s) and waits for it. */
async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once("exit", r));
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
  await exited;
  clearTimeout(timer);
}

/** A throwaway redis-server (no persistence) on a free port. */
export class Redis {
  private constructor(
    readonly port: number,
    private readonly child: ChildProcess,
  ) {}

  static async start(): Promise<Redis> {
    const port = await freePort();
    const child = spawn("redis-server", ["--port", `${port}`, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {
      stdio: "ignore",
    });
    await until("redis-server", 10_000, () => answers(port));
    return new Redis(port, child);
  }

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  stop(): Promise<void> {
    return stop(this.child);
  }
}

/**
 * The site file with its upstream ports (3001, 3002) pointed at `upstreams` and its
 * `listen 80` at `127.0.0.1:port`; everything else as shipped.
 */
export function siteFor(port: number, upstreams: [number, number]): string {
  const site = fs.readFileSync(SITE_FILE, "utf8");
  const replaced = site
    .replace("server 127.0.0.1:3001 ", `server 127.0.0.1:${upstreams[0]} `)
    .replace("server 127.0.0.1:3002 ", `server 127.0.0.1:${upstreams[1]} `)
    .replace(/^\s*listen \[::\]:80;\n/m, "")
    .replace(/^(\s*)listen 80;/m, `$1listen 127.0.0.1:${port};`);
  for (const expected of [`${upstreams[0]} `, `${upstreams[1]} `, `listen 127.0.0.1:${port};`]) {
    if (!replaced.includes(expected)) throw new Error(`${SITE_FILE} changed shape: cannot place ${expected}`);
  }
  return replaced;
}

/** nginx in the foreground with the shipped site, its files in a temporary directory. */
export class Nginx {
  private constructor(
    readonly port: number,
    private readonly child: ChildProcess,
    private readonly dir: string,
  ) {}

  static async start(upstreams: [number, number]): Promise<Nginx> {
    const port = await freePort();
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "sse-e2e-nginx-"));
    fs.writeFileSync(path.join(dir, "site.conf"), siteFor(port, upstreams));
    // What Debian's /etc/nginx/nginx.conf gives a site, with every path in `dir`.
    const temp = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
      .map((t) => `  ${t}_temp_path ${dir}/${t};`)
      .join("\n");
    fs.writeFileSync(
      path.join(dir, "nginx.conf"),
      `daemon off;
worker_processes 1;
pid ${dir}/nginx.pid;
error_log stderr warn;
events { worker_connections 1024; }
http {
  access_log off;
${temp}
  include ${dir}/site.conf;
}
`,
    );
    const child = spawn(NGINX, ["-p", dir, "-c", path.join(dir, "nginx.conf"), "-e", "stderr"], {
      stdio: ["ignore", "inherit", "inherit"],
    });
    await until("nginx", 10_000, async () => {
      if (child.exitCode !== null) throw new Error(`nginx exited with ${child.exitCode}`);
      return (await fetch(`http://127.0.0.1:${port}/healthz`)).ok;
    });
    return new Nginx(port, child, dir);
  }

  url(p = "/"): string {
    return `http://127.0.0.1:${this.port}${p}`;
  }

  async stop(): Promise<void> {
    await stop(this.child);
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Redis, two instances on it trusting the proxy's X-Forwarded-For, and nginx in front. */
export class Deployment {
  private constructor(
    readonly redis: Redis,
    readonly instances: [Server, Server],
    readonly nginx: Nginx,
  ) {}

  static async start(): Promise<Deployment> {
    const redis = await Redis.start();
    const env = { REDIS_URL: redis.url, SSE_TRUSTED_PROXIES: "127.0.0.1" };
    const instances: [Server, Server] = [await Server.start(env), await Server.start(env)];
    const nginx = await Nginx.start([instances[0].port, instances[1].port]);
    return new Deployment(redis, instances, nginx);
  }

  async stop(): Promise<void> {
    await this.nginx.stop();
    for (const instance of this.instances) await instance.stop();
    await this.redis.stop();
  }
}
