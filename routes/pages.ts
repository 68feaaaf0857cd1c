import type { FastifyPluginAsync, FastifyReply, FastifyRequest } from 'fastify'
import { createHash } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import path from 'node:path'

/**
 * The admin dashboard and the demo client: plain HTML, CSS and module scripts
 * from public/, read once at start-up and served from memory. No build step,
 * no inline script, no file-system lookups per request.
 */

export interface PagesOptions {
  /** Where the files live; the compiled module is dist/routes/pages.js. */
  publicDir?: string
  /** INTERNAL_PORT is set: the admin page and its script exist only there, and /demo does not link to it. */
  adminInternal?: boolean
}

export const PUBLIC_DIR = path.join(__dirname, '..', '..', 'public')

/** Every file a browser may fetch under /assets/: nothing else in public/ is reachable. */
export const ASSET_FILES = ['style.css', 'common.js', 'admin.js', 'demo.js', 'favicon.svg'] as const
const PAGE_FILES = { admin: 'admin.html', demo: 'demo.html' } as const

const CONTENT_TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.svg': 'image/svg+xml'
}

/**
 * Same-origin only, no inline script or style. `connect-src 'self'` covers the
 * page's fetch calls and the demo's same-origin EventSource; `form-action 'none'`
 * makes sure a form can never navigate with a token in its URL.
 */
export const PAGE_CSP = [
  "default-src 'self'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self' data:",
  "connect-src 'self'",
  "object-src 'none'",
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors 'none'"
].join('; ')

interface StaticFile {
  body: Buffer
  contentType: string
  etag: string
}

async function load (dir: string, name: string): Promise<StaticFile> {
  const file = path.join(dir, name)
  let body: Buffer
  try {
    body = await readFile(file)
  } catch (error) {
    throw new Error(`page asset ${file} cannot be read (${(error as NodeJS.ErrnoException).code ?? 'error'}): public/ must ship beside dist/`)
  }
  const contentType = CONTENT_TYPES[path.extname(name)] ?? 'application/octet-stream'
  return { body, contentType, etag: etagOf(body) }
}

function etagOf (body: Buffer): string {
  return `"${createHash('sha256').update(body).digest('base64url').slice(0, 27)}"`
}

function send (request: FastifyRequest, reply: FastifyReply, file: StaticFile, csp: boolean): FastifyReply {
  reply
    .header('content-type', file.contentType)
    .header('x-content-type-options', 'nosniff')
    .header('cache-control', 'no-cache')
    .header('etag', file.etag)
    .header('referrer-policy', 'no-referrer')
  if (csp) {
    reply
      .header('content-security-policy', PAGE_CSP)
      .header('x-frame-options', 'DENY')
  }
  if (request.headers['if-none-match'] === file.etag) return reply.code(304).send()
  return reply.send(file.body)
}

const ADMIN_LINK = '<a href="admin">Admin</a>'

function withoutAdminLink (page: StaticFile): StaticFile {
  const html = page.body.toString('utf8')
  if (!html.includes(ADMIN_LINK)) throw new Error(`${PAGE_FILES.demo} no longer holds the admin link ${ADMIN_LINK}: update pages.ts`)
  const body = Buffer.from(html.replace(ADMIN_LINK, ''))
  return { body, contentType: page.contentType, etag: etagOf(body) }
}

const pageRoutes: FastifyPluginAsync<PagesOptions> = async (app, options) => {
  const dir = options.publicDir ?? PUBLIC_DIR
  const [admin, demo, ...assets] = await Promise.all([
    load(dir, PAGE_FILES.admin),
    load(dir, PAGE_FILES.demo),
    ...ASSET_FILES.map(async (name) => await load(dir, name))
  ])
  const assetsByName = new Map<string, StaticFile>(ASSET_FILES.map((name, index) => [name, assets[index]]))
  const adminScript = assetsByName.get('admin.js')
  // The admin page's own script goes where the page goes (below).
  assetsByName.delete('admin.js')
  // Read on the public listener, a link to the admin page would lead to a 404.
  const demoPage = options.adminInternal === true ? withoutAdminLink(demo) : demo

  // The page is public HTML; the admin APIs it calls check the admin token.
  // With INTERNAL_PORT it exists only on the internal listener, like those APIs.
  app.get('/admin', { config: { auth: 'none', internal: true } }, async (request, reply) => send(request, reply, admin, true))

  if (adminScript !== undefined) {
    app.get('/assets/admin.js', { config: { auth: 'none', internal: true } }, async (request, reply) => send(request, reply, adminScript, false))
  }

  app.get('/demo', { config: { auth: 'none' } }, async (request, reply) => send(request, reply, demoPage, true))

  app.get('/assets/:file', {
    config: { auth: 'none' },
    schema: { params: { type: 'object', properties: { file: { type: 'string', maxLength: 64 } }, required: ['file'] } }
  }, async (request, reply) => {
    const { file } = request.params as { file: string }
    const asset = assetsByName.get(file)
    if (asset === undefined) {
      reply.callNotFound()
      return reply
    }
    return send(request, reply, asset, false)
  })
}

export default pageRoutes
