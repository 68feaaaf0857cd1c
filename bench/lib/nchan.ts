/**
 * nginx + Nchan, the peer the gateway's targets were set against, as an
 * optional third target. Run in the same invocation as the gateway, on the
 * same core and with the same client, its figures give a ratio that holds
 * when the machine is slower or faster than on the day a table was written.
 *
 * It needs nginx and Nchan's dynamic module (Debian: `nginx` and
 * `libnginx-mod-nchan`). One worker process, as in the targets' figures; the
 * streams subscribe with Nchan's EventSource subscriber and the bench's
 * publisher posts to Nchan's publisher location.
 */
import { execFileSync } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

export interface NchanInstall {
  nginx: string
  module: string
}

const MODULE_PATHS = [
  '/usr/lib/nginx/modules/ngx_nchan_module.so',
  '/usr/lib64/nginx/modules/ngx_nchan_module.so',
  '/usr/local/nginx/modules/ngx_nchan_module.so'
]

let found: NchanInstall | null | undefined

/**
 * nginx and Nchan's module, from $NGINX / $NCHAN_MODULE or the usual places,
 * once `nginx -t` has loaded the module (a module built for another nginx
 * fails there, not in every run); null otherwise.
 */
export function findNchan (): NchanInstall | null {
  if (found !== undefined) return found
  found = null
  const nginx = process.env.NGINX ?? ['/usr/sbin/nginx', '/usr/local/sbin/nginx', '/usr/local/nginx/sbin/nginx'].find((path) => existsSync(path)) ?? 'nginx'
  const module = process.env.NCHAN_MODULE ?? MODULE_PATHS.find((path) => existsSync(path))
  if (module === undefined || !existsSync(module)) return found
  const dir = mkdtempSync(join(tmpdir(), 'bench-nchan-'))
  try {
    const config = join(dir, 'nginx.conf')
    writeFileSync(config, nchanConfig({ module, host: '127.0.0.1', port: 1, dir, errorLog: join(dir, 'error.log'), connections: 16 }))
    execFileSync(nginx, ['-t', '-q', '-p', dir, '-c', config, '-e', join(dir, 'error.log')], { stdio: 'ignore' })
    found = { nginx, module }
  } catch {
    // no nginx, or one that cannot load this module
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
  return found
}

export interface NchanConfigOptions {
  module: string
  host: string
  port: number
  /** Directory for the pid file and nginx's temporary files. */
  dir: string
  errorLog: string
  /** worker_connections (see workerConnectionsFor). */
  connections: number
}

/**
 * The bench's routes, in Nchan: `GET /v1/stream?topics=T` subscribes to channel
 * T; `POST /v1/publish?topic=T` publishes its body to channel T; `/health`
 * answers the readiness check; `/stats` is Nchan's stub status (its
 * `subscribers:` line is the server's own stream count). Everything else is
 * Nchan's and nginx's defaults, but for `multi_accept on`: a connect burst is
 * S1's whole load, and accepting every pending connection per wake-up is how
 * nginx is set up for one.
 */
export function nchanConfig (options: NchanConfigOptions): string {
  const { dir } = options
  return `load_module ${options.module};
daemon off;
master_process on;
worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${options.errorLog} warn;
events {
  worker_connections ${options.connections};
  multi_accept on;
}
http {
  access_log off;
  client_body_temp_path ${dir}/client_body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  server {
    listen ${options.host}:${options.port};
    location = /health { return 200 "ok\\n"; }
    location = /stats { nchan_stub_status; }
    location = /v1/stream {
      nchan_subscriber eventsource;
      nchan_channel_id $arg_topics;
    }
    location = /v1/publish {
      nchan_publisher;
      nchan_channel_id $arg_topic;
    }
  }
}
`
}

/**
 * worker_connections for `inUse` connections at once. nginx keeps a sixteenth
 * of its slots in reserve: once fewer are free, it closes connections that
 * are still waiting for their request (ngx_drain_connections, logged as
 * "worker_connections are not enough, reusing connections"). Streams opening
 * in a burst are such connections, so the slots must hold 16/15 of them.
 */
export function workerConnectionsFor (inUse: number): number {
  return Math.ceil(inUse * 16 / 15) + 16
}

/** The `subscribers:` count in Nchan's stub status, or null. */
export function stubStatusSubscribers (body: string): number | null {
  const match = /^subscribers:\s*(\d+)/m.exec(body)
  return match === null ? null : Number(match[1])
}
