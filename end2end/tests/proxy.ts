// A buffering proxy, as some corporate middleboxes and CDNs are: it passes the headers of a
// `text/event-stream` response at once, then holds its body until 8 KiB or 30 s have
// gathered. Everything else (pages, server functions, WebSocket upgrades) passes through.
import * as http from "node:http";
import * as net from "node:net";

const HOLD_BYTES = 8 * 1024;
const HOLD_MS = 30_000;

export class BufferingProxy {
  /** When false, new responses pass through unbuffered (the proxy is "removed"). */
  buffering = true;
  private readonly server: http.Server;
  private readonly sockets = new Set<net.Socket>();

  private constructor(private readonly upstreamPort: number) {
    this.server = http.createServer((req, res) => this.forward(req, res));
    this.server.on("upgrade", (req, socket, head) => this.tunnel(req, socket as net.Socket, head));
    this.server.on("connection", (socket) => this.track(socket));
  }

  /** A proxy on a free port in front of `127.0.0.1:upstreamPort`. */
  static async start(upstreamPort: number): Promise<BufferingProxy> {
    const proxy = new BufferingProxy(upstreamPort);
    await new Promise<void>((resolve) => proxy.server.listen(0, "127.0.0.1", resolve));
    return proxy;
  }

  get port(): number {
    return (this.server.address() as net.AddressInfo).port;
  }

  url(p = "/"): string {
    return `http://127.0.0.1:${this.port}${p}`;
  }

  async stop(): Promise<void> {
    for (const socket of this.sockets) socket.destroy();
    await new Promise((resolve) => this.server.close(resolve));
  }

  private track(socket: net.Socket): void {
    this.sockets.add(socket);
    socket.on("close", () => this.sockets.delete(socket));
  }

  private forward(req: http.IncomingMessage, res: http.ServerResponse): void {
    const upstream = http.request(
      { host: "127.0.0.1", port: this.upstreamPort, method: req.method, path: req.url, headers: req.headers },
      (answer) => {
        res.writeHead(answer.statusCode ?? 502, answer.headers);
        res.flushHeaders();
        const isStream = String(answer.headers["content-type"] ?? "").startsWith("text/event-stream");
        if (!isStream || !this.buffering) {
          answer.pipe(res);
          return;
        }
        let held: Buffer[] = [];
        let size = 0;
        const flush = () => {
          if (held.length > 0) res.write(Buffer.concat(held));
          held = [];
          size = 0;
        };
        let timer = setTimeout(function release() {
          flush();
          timer = setTimeout(release, HOLD_MS);
        }, HOLD_MS);
        answer.on("data", (chunk: Buffer) => {
          held.push(chunk);
          size += chunk.length;
          if (size >= HOLD_BYTES) flush();
        });
        answer.on("end", () => {
          clearTimeout(timer);
          flush();
          res.end();
        });
        answer.on("error", () => clearTimeout(timer));
        res.on("close", () => {
          clearTimeout(timer);
          answer.destroy();
        });
      },
    );
    upstream.on("error", () => res.destroy());
    res.on("close", () => upstream.destroy());
    req.pipe(upstream);
  }

  /** WebSocket upgrades: the request head again, then bytes both ways. */
  private tunnel(req: http.IncomingMessage, client: net.Socket, head: Buffer): void {
    const upstream = net.connect(this.upstreamPort, "127.0.0.1", () => {
      const lines = [`${req.method} ${req.url} HTTP/1.1`];
      for (let i = 0; i < req.rawHeaders.length; i += 2) lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
      upstream.write(lines.join("\r\n") + "\r\n\r\n");
      if (head.length > 0) upstream.write(head);
      upstream.pipe(client);
      client.pipe(upstream);
    });
    this.track(upstream);
    const end = () => {
      client.destroy();
      upstream.destroy();
    };
    upstream.on("error", end);
    client.on("error", end);
    upstream.on("close", end);
    client.on("close", end);
  }
}
