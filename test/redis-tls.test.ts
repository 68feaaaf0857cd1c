/**
 * Redis over TLS (`rediss://`), as managed Redis services serve it: a
 * redis-server of the test's own that listens on a TLS port only, with a
 * certificate of a private CA. The gateway verifies the certificate (Node's
 * CAs, plus NODE_EXTRA_CA_CERTS), and serves once it trusts it.
 */
import { execFileSync, spawn } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import Redis from 'ioredis'
import t, { type Test } from 'tap'
import { freePort, openConnected, publisherToken, publishOk, runServerToExit, spawnServer, TEST_SECRET, userToken } from './helpers'
import { needRedis, uniquePrefix } from './helpers/redis'

interface TlsRedis { port: number, ca: string }

/** A redis-server with only a TLS port, its certificate made for 127.0.0.1; stopped in teardown. */
async function startTlsRedis (t: Test): Promise<TlsRedis> {
  const dir = await mkdtemp(join(tmpdir(), 'gw-tls-redis-'))
  t.teardown(async () => await rm(dir, { recursive: true, force: true }))
  const cert = join(dir, 'cert.pem')
  const key = join(dir, 'key.pem')
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '1',
    '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1', '-keyout', key, '-out', cert], { stdio: 'ignore' })
  const port = await freePort()
  const server = spawn('redis-server', ['--port', '0', '--tls-port', String(port), '--tls-cert-file', cert, '--tls-key-file', key,
    '--tls-ca-cert-file', cert, '--tls-auth-clients', 'no', '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' })
  const exited = new Promise((resolve) => server.once('exit', resolve))
  t.teardown(async () => {
    if (server.exitCode === null && server.signalCode === null) {
      server.kill('SIGKILL')
      await exited
    }
  })
  const deadline = Date.now() + 10_000
  for (;;) {
    const client = new Redis({ host: '127.0.0.1', port, tls: { ca: readFileSync(cert) }, lazyConnect: true, retryStrategy: () => null, maxRetriesPerRequest: 0 })
    client.on('error', () => {})
    try {
      await client.connect()
      if (await client.ping() === 'PONG') return { port, ca: cert }
    } catch {
      if (Date.now() > deadline) throw new Error('the TLS redis-server did not answer within 10 s')
    } finally {
      client.disconnect()
    }
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}

t.test('rediss://: the gateway serves over a TLS Redis whose CA NODE_EXTRA_CA_CERTS names, and refuses to start on one it cannot verify', async (t) => {
  // needRedis stands for "redis-server is installed and runs here".
  if (!(await needRedis(t))) return
  const redis = await startTlsRedis(t)
  const env = { JWT_SECRET: TEST_SECRET, REDIS_URL: `rediss://127.0.0.1:${redis.port}`, REDIS_PREFIX: uniquePrefix('tls') }

  const unverified = await runServerToExit(t, { ...env, PORT: String(await freePort()), REDIS_STARTUP_TIMEOUT_MS: '1000' })
  t.equal(unverified.code, 1, 'without the CA, start-up fails')
  t.match(unverified.stderr, /self[- ]signed certificate/i, 'saying the certificate could not be verified')

  const gateway = await spawnServer(t, { ...env, NODE_EXTRA_CA_CERTS: redis.ca })
  const { stream } = await openConnected(`${gateway.url}/v1/stream?token=${userToken('u1')}`, { t })
  const [id] = await publishOk(gateway.url, publisherToken(), { to: { user: 'u1' }, event: 'note', data: 'over tls' })
  const note = await stream.nextEvent('note')
  t.same([note.id, note.data], [id, 'over tls'], 'published through Redis over TLS, and delivered')
})
