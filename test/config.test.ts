import t from 'tap'
import { generateKeyPairSync } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { ConfigError, loadConfig } from '../src/config'
import { loggedAs, openConnected, publishOk, publisherToken, request, rsaKeyPair, runServerToExit, spawnServer, startGateway, TEST_SECRET, userToken } from './helpers'

t.test('defaults: only JWT_SECRET set', async (t) => {
  const config = loadConfig({ JWT_SECRET: 's3cret' })
  t.match(config, {
    port: 3000,
    host: '0.0.0.0',
    internalPort: null,
    jwtSecret: 's3cret',
    jwtPublicKey: null,
    jwtIssuer: null,
    jwtAudience: null,
    jwtUserClaim: 'sub',
    jwtCookie: null,
    redisUrl: null,
    redisPrefix: 'sse:',
    corsOrigins: null,
    keepaliveMs: 15000,
    retryMs: 3000,
    historySize: 1000,
    historyTtlS: 3600,
    historyMaxBytes: 256 * 1024 * 1024,
    maxConnections: 100000,
    maxConnectionsPerUser: 20,
    connectionLimitPolicy: 'reject',
    maxBufferedBytes: 1048576,
    maxEventBytes: 262144,
    maxBodyBytes: 1048576,
    presenceGraceMs: 2000,
    jobTtlS: 86400,
    shutdownTimeoutMs: 10000,
    redisStartupTimeoutMs: 30000,
    redisCommandTimeoutMs: 5000,
    idempotencyWindowS: 600,
    logLevel: 'info'
  })
})

t.test('every variable is read', async (t) => {
  const config = loadConfig({
    PORT: '8080',
    HOST: '127.0.0.1',
    INTERNAL_PORT: '8081',
    JWT_SECRET: 'x',
    JWT_ISSUER: 'iss',
    JWT_AUDIENCE: 'aud',
    JWT_USER_CLAIM: 'uid',
    JWT_COOKIE: 'sse_token',
    REDIS_PREFIX: 'gw:',
    CORS_ORIGINS: 'https://a.example.com, https://b.example.com',
    KEEPALIVE_MS: '5000',
    RETRY_MS: '1000',
    HISTORY_SIZE: '50',
    HISTORY_TTL_S: '60',
    HISTORY_MAX_BYTES: '65536',
    MAX_CONNECTIONS: '10',
    MAX_CONNECTIONS_PER_USER: '2',
    CONNECTION_LIMIT_POLICY: 'evict-oldest',
    MAX_BUFFERED_BYTES: '65536',
    MAX_EVENT_BYTES: '1000',
    MAX_BODY_BYTES: '2000',
    PRESENCE_GRACE_MS: '0',
    JOB_TTL_S: '10',
    SHUTDOWN_TIMEOUT_MS: '500',
    REDIS_STARTUP_TIMEOUT_MS: '0',
    REDIS_COMMAND_TIMEOUT_MS: '750',
    IDEMPOTENCY_WINDOW_S: '5',
    LOG_LEVEL: 'debug'
  })
  t.match(config, {
    port: 8080,
    host: '127.0.0.1',
    internalPort: 8081,
    jwtIssuer: 'iss',
    jwtAudience: 'aud',
    jwtUserClaim: 'uid',
    jwtCookie: 'sse_token',
    redisPrefix: 'gw:',
    corsOrigins: ['https://a.example.com', 'https://b.example.com'],
    keepaliveMs: 5000,
    retryMs: 1000,
    historySize: 50,
    historyTtlS: 60,
    historyMaxBytes: 65536,
    maxConnections: 10,
    maxConnectionsPerUser: 2,
    connectionLimitPolicy: 'evict-oldest',
    maxBufferedBytes: 65536,
    maxEventBytes: 1000,
    maxBodyBytes: 2000,
    presenceGraceMs: 0,
    jobTtlS: 10,
    shutdownTimeoutMs: 500,
    redisStartupTimeoutMs: 0,
    redisCommandTimeoutMs: 750,
    idempotencyWindowS: 5,
    logLevel: 'debug'
  })
})

t.test('JWT_PUBLIC_KEY: EC keys on the ES algorithms\' curves are accepted', async (t) => {
  for (const namedCurve of ['prime256v1', 'secp384r1', 'secp521r1']) {
    const pem = generateKeyPairSync('ec', { namedCurve }).publicKey.export({ type: 'spki', format: 'pem' }).toString()
    t.equal(loadConfig({ JWT_PUBLIC_KEY: pem }).jwtPublicKey?.trim(), pem.trim(), namedCurve)
  }
})

t.test('JWT_PUBLIC_KEY alone is enough (and "\\n" escapes become newlines)', async (t) => {
  const { publicKeyPem } = rsaKeyPair()
  const config = loadConfig({ JWT_PUBLIC_KEY: publicKeyPem.replace(/\n/g, '\\n') })
  t.equal(config.jwtSecret, null)
  t.equal(config.jwtPublicKey, publicKeyPem)
})

/** Asserts that `env` is refused with a ConfigError naming `variable`. */
function refuses (t: tap.Test, env: Record<string, string>, variable: string): void {
  let caught: unknown
  try {
    loadConfig(env)
  } catch (error) {
    caught = error
  }
  t.ok(caught instanceof ConfigError, `${JSON.stringify(env)} throws a ConfigError`)
  if (caught instanceof ConfigError) {
    t.equal(caught.variable, variable, `it names ${variable}`)
    t.match(caught.message, variable, 'the message names the variable')
    t.notMatch(caught.message, /\n/, 'the message is one line')
  }
}

t.test('HISTORY_MAX_BYTES holds at least two of the largest events: its default grows with MAX_EVENT_BYTES, a smaller setting is refused', async (t) => {
  t.equal(loadConfig({ JWT_SECRET: 'x', MAX_EVENT_BYTES: '209715200' }).historyMaxBytes, 4 * 209715200)
  t.equal(loadConfig({ JWT_SECRET: 'x', MAX_EVENT_BYTES: '40000', HISTORY_MAX_BYTES: '80000' }).historyMaxBytes, 80000)
  refuses(t, { JWT_SECRET: 'x', MAX_EVENT_BYTES: '40000', HISTORY_MAX_BYTES: '79999' }, 'HISTORY_MAX_BYTES')
  t.equal(loadConfig({ JWT_SECRET: 'x', HISTORY_MAX_BYTES: '0' }).historyMaxBytes, 0, '0: no cap')
})

t.test('the bounds the README gives each number are the ones start-up enforces', async (t) => {
  const readme = readFileSync(join(__dirname, '..', '..', 'README.md'), 'utf8')
  const paragraph = /Numbers are whole and decimal, within these bounds:([\s\S]*?)\n\n/.exec(readme)?.[1] ?? ''
  t.ok(paragraph.length > 0, 'the README has the bounds')
  // "`A`, `B` and `C` 0–3 600 000" or "`A` ≥ 1024": the names of a clause share its bound.
  const clauses = paragraph.replace(/\s+/g, ' ').split(';')
  let checked = 0
  for (const clause of clauses) {
    const bounds = /(\d[\d ]*)–(\d[\d ]*\d)|≥ (\d+)/.exec(clause)
    if (bounds === null) continue
    const low = Number((bounds[1] ?? bounds[3]).replace(/ /g, ''))
    const high = bounds[2] !== undefined ? Number(bounds[2].replace(/ /g, '')) : null
    for (const [, name] of clause.slice(0, bounds.index).matchAll(/`([A-Z_]+)`/g)) {
      const base = { JWT_SECRET: 'x' }
      t.doesNotThrow(() => loadConfig({ ...base, [name]: String(low) }), `${name}=${low} is accepted`)
      refuses(t, { ...base, [name]: String(low - 1) }, name)
      if (high !== null) {
        t.doesNotThrow(() => loadConfig({ ...base, [name]: String(high) }), `${name}=${high} is accepted`)
        refuses(t, { ...base, [name]: String(high + 1) }, name)
      }
      checked++
    }
  }
  t.ok(checked >= 15, `every bound was read (${checked})`)
})

t.test('invalid values throw a ConfigError naming the variable', async (t) => {
  const base = { JWT_SECRET: 'x' }
  refuses(t, { ...base, PORT: 'abc' }, 'PORT')
  refuses(t, { ...base, PORT: '3000x' }, 'PORT')
  refuses(t, { ...base, PORT: '-1' }, 'PORT')
  refuses(t, { ...base, PORT: '65536' }, 'PORT')
  refuses(t, { ...base, PORT: '1.5' }, 'PORT')
  refuses(t, { ...base, INTERNAL_PORT: 'internal' }, 'INTERNAL_PORT')
  refuses(t, { ...base, CONNECTION_LIMIT_POLICY: 'drop-newest' }, 'CONNECTION_LIMIT_POLICY')
  refuses(t, { ...base, KEEPALIVE_MS: 'often' }, 'KEEPALIVE_MS')
  refuses(t, { ...base, RETRY_MS: '3s' }, 'RETRY_MS')
  refuses(t, { ...base, HISTORY_SIZE: '-5' }, 'HISTORY_SIZE')
  refuses(t, { ...base, HISTORY_TTL_S: 'forever' }, 'HISTORY_TTL_S')
  refuses(t, { ...base, HISTORY_MAX_BYTES: '65535' }, 'HISTORY_MAX_BYTES')
  refuses(t, { ...base, HISTORY_MAX_BYTES: '524287' }, 'HISTORY_MAX_BYTES')
  refuses(t, { ...base, MAX_EVENT_BYTES: '1000', HISTORY_MAX_BYTES: '65535' }, 'HISTORY_MAX_BYTES')
  refuses(t, { ...base, HISTORY_MAX_BYTES: '256MB' }, 'HISTORY_MAX_BYTES')
  refuses(t, { ...base, MAX_CONNECTIONS: 'lots' }, 'MAX_CONNECTIONS')
  refuses(t, { ...base, MAX_EVENT_BYTES: '256k' }, 'MAX_EVENT_BYTES')
  refuses(t, { ...base, MAX_BODY_BYTES: '1e6' }, 'MAX_BODY_BYTES')
  refuses(t, { ...base, SHUTDOWN_TIMEOUT_MS: 'soon' }, 'SHUTDOWN_TIMEOUT_MS')
  refuses(t, { ...base, REDIS_STARTUP_TIMEOUT_MS: '-1' }, 'REDIS_STARTUP_TIMEOUT_MS')
  refuses(t, { ...base, IDEMPOTENCY_WINDOW_S: '0' }, 'IDEMPOTENCY_WINDOW_S')
  refuses(t, { ...base, JWT_COOKIE: 'sse token' }, 'JWT_COOKIE')
  refuses(t, { ...base, JWT_COOKIE: 'a;b' }, 'JWT_COOKIE')
  refuses(t, { ...base, JWT_COOKIE: 'sse_token', CORS_ORIGINS: 'https://a.example.com,*' }, 'JWT_COOKIE')
  refuses(t, { ...base, LOG_LEVEL: 'loud' }, 'LOG_LEVEL')
  refuses(t, { ...base, REDIS_URL: 'localhost:6379' }, 'REDIS_URL')
  refuses(t, { ...base, JWT_PUBLIC_KEY: 'not a pem' }, 'JWT_PUBLIC_KEY')
  refuses(t, { ...base, JWT_PUBLIC_KEY: '-----BEGIN PUBLIC KEY-----garbage-----END PUBLIC KEY-----' }, 'JWT_PUBLIC_KEY')
  refuses(t, { ...base, JWT_PUBLIC_KEY: rsaKeyPair().privateKey.export({ type: 'pkcs8', format: 'pem' }).toString() }, 'JWT_PUBLIC_KEY')
  const publicPem = (type: 'ed25519' | 'ec', namedCurve?: string): string =>
    generateKeyPairSync(type as 'ec', { namedCurve: namedCurve ?? '' }).publicKey.export({ type: 'spki', format: 'pem' }).toString()
  // Keys no RS/PS/ES token can be verified with: refused here, naming the variable, not by the verifier later.
  refuses(t, { ...base, JWT_PUBLIC_KEY: publicPem('ed25519') }, 'JWT_PUBLIC_KEY')
  refuses(t, { ...base, JWT_PUBLIC_KEY: publicPem('ec', 'secp256k1') }, 'JWT_PUBLIC_KEY')
  refuses(t, { ...base, REDIS_URL: 'redis://127.0.0.1:6379/abc' }, 'REDIS_URL')
  refuses(t, { ...base, REDIS_URL: 'redis://127.0.0.1:port' }, 'REDIS_URL')
  refuses(t, { ...base, REDIS_URL: 'redis://' }, 'REDIS_URL')
  refuses(t, { ...base, TRUST_PROXY: 'true' }, 'TRUST_PROXY')
  refuses(t, { ...base, TRUST_PROXY: '10.0.0.0/33' }, 'TRUST_PROXY')
  refuses(t, { ...base, TRUST_PROXY: '127.0.0.1,nginx' }, 'TRUST_PROXY')
})

t.test('a REDIS_PREFIX under the ingress channels\' stream:* is refused: the ingress would take the gateway\'s own channels for its messages', async (t) => {
  t.throws(() => loadConfig({ JWT_SECRET: 's', REDIS_PREFIX: 'stream:app:' }), { message: /REDIS_PREFIX.*stream:/ })
  t.throws(() => loadConfig({ JWT_SECRET: 's', REDIS_PREFIX: 'stream:' }), { message: /REDIS_PREFIX/ })
  t.equal(loadConfig({ JWT_SECRET: 's', REDIS_PREFIX: 'streams:' }).redisPrefix, 'streams:', 'a prefix that only looks like it is kept')
})

t.test('an empty REDIS_PREFIX is the default, as an empty value is for every variable', async (t) => {
  t.equal(loadConfig({ JWT_SECRET: 's', REDIS_PREFIX: '' }).redisPrefix, 'sse:')
  t.equal(loadConfig({ JWT_SECRET: 's', REDIS_PREFIX: '  ' }).redisPrefix, 'sse:')
})

t.test('TRUST_PROXY: addresses, CIDRs and proxy-addr\'s range names are accepted', async (t) => {
  t.same(loadConfig({ JWT_SECRET: 'x', TRUST_PROXY: '10.0.0.0/8, 127.0.0.1,::1,fd00::/8,loopback' }).trustProxy, ['10.0.0.0/8', '127.0.0.1', '::1', 'fd00::/8', 'loopback'])
})

t.test('CORS_ORIGINS: each origin is kept as a browser sends it (host in lower case, no default port), or it would never match', async (t) => {
  const config = loadConfig({ JWT_SECRET: 'x', CORS_ORIGINS: 'https://App.Example.com, https://b.example:443,http://c.example:80,http://d.example:8080,*' })
  t.same(config.corsOrigins, ['https://app.example.com', 'https://b.example', 'http://c.example', 'http://d.example:8080', '*'])
  refuses(t, { JWT_SECRET: 'x', CORS_ORIGINS: 'https://[::1' }, 'CORS_ORIGINS')
})

t.test('REDIS_URL: host, port, credentials and a database number are accepted', async (t) => {
  for (const url of ['redis://127.0.0.1:6379', 'redis://redis', 'rediss://user:secret@redis.example.com:6380/2', 'redis://:pw@10.0.0.1/', 'redis://[::1]:6379/15']) {
    t.equal(loadConfig({ JWT_SECRET: 'x', REDIS_URL: url }).redisUrl, url, url)
  }
})

t.test('REDIS_SENTINELS: host[:port] entries (26379 by default); REDIS_URL then names the master group, without a port', async (t) => {
  const config = loadConfig({ JWT_SECRET: 'x', REDIS_URL: 'redis://:pw@mymaster/2', REDIS_SENTINELS: ' 10.0.0.1:26380, sentinel-b ,[::1]:5000', REDIS_SENTINEL_PASSWORD: 'spw' })
  t.same(config.redisSentinels, [{ host: '10.0.0.1', port: 26380 }, { host: 'sentinel-b', port: 26379 }, { host: '::1', port: 5000 }])
  t.equal(config.redisSentinelPassword, 'spw')
  t.same(loadConfig({ JWT_SECRET: 'x', REDIS_URL: 'redis://127.0.0.1:6379' }).redisSentinels, [], 'none by default')
  const base = { JWT_SECRET: 'x', REDIS_URL: 'redis://mymaster' }
  refuses(t, { JWT_SECRET: 'x', REDIS_SENTINELS: '10.0.0.1' }, 'REDIS_SENTINELS')
  refuses(t, { ...base, REDIS_SENTINELS: '10.0.0.1:0' }, 'REDIS_SENTINELS')
  refuses(t, { ...base, REDIS_SENTINELS: '10.0.0.1:65536' }, 'REDIS_SENTINELS')
  refuses(t, { ...base, REDIS_SENTINELS: '10.0.0.1,,10.0.0.2' }, 'REDIS_SENTINELS')
  refuses(t, { ...base, REDIS_SENTINELS: 'redis://10.0.0.1:26379' }, 'REDIS_SENTINELS')
  refuses(t, { ...base, REDIS_URL: 'redis://mymaster:6379', REDIS_SENTINELS: '10.0.0.1' }, 'REDIS_URL')
  refuses(t, { ...base, REDIS_URL: 'rediss://mymaster', REDIS_SENTINELS: '10.0.0.1' }, 'REDIS_URL')
})

t.test('JWT_SECRET is used as given, spaces included (the signer uses it so); a blank one is unset', async (t) => {
  t.equal(loadConfig({ JWT_SECRET: ' padded secret\t' }).jwtSecret, ' padded secret\t')
  refuses(t, { JWT_SECRET: '  ' }, 'JWT_SECRET')
})

t.test('neither JWT_SECRET nor JWT_PUBLIC_KEY: a ConfigError naming JWT_SECRET and JWT_PUBLIC_KEY', async (t) => {
  refuses(t, {}, 'JWT_SECRET')
  refuses(t, { JWT_SECRET: '   ' }, 'JWT_SECRET')
  let message = ''
  try {
    loadConfig({ PORT: '3000' })
  } catch (error) {
    message = (error as Error).message
  }
  t.match(message, /JWT_PUBLIC_KEY/, 'the message mentions the alternative')
})

t.test('the compiled server refuses a bad environment: exit code 1 and one stderr line naming the variable', async (t) => {
  const cases: Array<[string, Record<string, string>, string]> = [
    ['no JWT_SECRET nor JWT_PUBLIC_KEY', {}, 'JWT_SECRET'],
    ['a non-number PORT', { JWT_SECRET: 'x', PORT: 'eighty' }, 'PORT'],
    ['an unknown CONNECTION_LIMIT_POLICY', { JWT_SECRET: 'x', CONNECTION_LIMIT_POLICY: 'random' }, 'CONNECTION_LIMIT_POLICY']
  ]
  for (const [name, env, variable] of cases) {
    t.test(name, async (t) => {
      const exit = await runServerToExit(t, env)
      t.equal(exit.code, 1, 'exit code 1')
      const lines = exit.stderr.trimEnd().split('\n')
      t.equal(lines.length, 1, `one line on stderr: ${JSON.stringify(exit.stderr)}`)
      t.match(lines[0], variable, `it names ${variable}`)
      t.notMatch(exit.stderr, /\bat .*\.js:\d+/, 'no stack trace')
    })
  }
})

t.test('the compiled server starts with only JWT_SECRET (and a free PORT) and serves the API in embedded mode', async (t) => {
  const server = await spawnServer(t, { JWT_SECRET: TEST_SECRET })
  const health = await request(`${server.url}/health`)
  t.equal(health.status, 200)
  t.same(health.json, { status: 'ok' })
  const ready = await request(`${server.url}/ready`)
  t.equal(ready.status, 200)
  const { stream, connected } = await openConnected(`${server.url}/v1/stream?token=${userToken('u1')}`, { t })
  t.equal(connected.userId, 'u1')
  const [id] = await publishOk(server.url, publisherToken(), { to: { user: 'u1' }, event: 'hello', data: 'from a child process' })
  const event = await stream.nextEvent('hello')
  t.equal(event.id, id)
  t.equal(event.data, 'from a child process')
  stream.close()
  server.child.kill('SIGTERM')
  t.equal((await server.waitExit(15_000)).code, 0)
})

t.test('a JWT_SECRET with whitespace at an end: the gateway says so at start, once, without the secret', async (t) => {
  const padded = await startGateway(t, { JWT_SECRET: 'padded-secret-value\n' }, { captureLogs: true })
  const warnings = loggedAs(padded.logText(), 'JWT_SECRET begins or ends with whitespace; it is used as given, so tokens must be signed with exactly that')
  t.equal(warnings.length, 1, 'one warning')
  t.notMatch(padded.logText(), 'padded-secret-value', 'the secret is not in the log')
  const plain = await startGateway(t, { JWT_SECRET: 'plain-secret-of-thirty-two-bytes' }, { captureLogs: true })
  t.notMatch(plain.logText(), 'JWT_SECRET', 'nothing to say about a secret without')
})

t.test('a JWT_SECRET shorter than 32 bytes: the gateway warns at start, once, without the secret; 32 bytes pass', async (t) => {
  const short = await startGateway(t, { JWT_SECRET: 'change-me' }, { captureLogs: true })
  const warnings = loggedAs<{ bytes: number }>(short.logText(), 'JWT_SECRET is shorter than 32 bytes: anyone holding a token could guess it offline and forge others (e.g. openssl rand -base64 32)')
  t.same(warnings.map((line) => line.bytes), [9], 'one warning, with the length')
  t.notMatch(short.logText(), 'change-me', 'the secret is not in the log')
  const long = await startGateway(t, { JWT_SECRET: 'x'.repeat(32) }, { captureLogs: true })
  t.notMatch(long.logText(), 'JWT_SECRET', 'nothing to say about 32 bytes')
})
