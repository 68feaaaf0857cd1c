/**
 * `npm run token` (scripts/token.js), as the README shows it: tokens it mints
 * with the configured secret open streams and, with `--roles publisher`,
 * publish; without that role a publish is refused. A --ttl it cannot read
 * is refused, never turned into a token the gateway then calls malformed.
 */
import t from 'tap'
import { execFile } from 'node:child_process'
import { join } from 'node:path'
import { openConnected, publish, startGateway, TEST_SECRET } from './helpers'

const SCRIPT = join(__dirname, '..', '..', 'scripts', 'token.js')

interface Minted { code: number, stdout: string, stderr: string }

async function run (args: string[], env: Record<string, string> = { JWT_SECRET: TEST_SECRET }): Promise<Minted> {
  return await new Promise((resolve) => {
    execFile(process.execPath, [SCRIPT, ...args], { env: { PATH: process.env.PATH ?? '/usr/bin:/bin', ...env }, timeout: 15_000 }, (error, stdout, stderr) => {
      resolve({ code: error === null ? 0 : typeof error.code === 'number' ? error.code : -1, stdout, stderr })
    })
  })
}

/** The token minted with `args`; fails the caller when the script does. */
async function mint (args: string[]): Promise<string> {
  const minted = await run(args)
  if (minted.code !== 0) throw new Error(`scripts/token.js ${args.join(' ')} exited ${minted.code}: ${minted.stderr}`)
  return minted.stdout.trim()
}

function claimsOf (jwt: string): Record<string, unknown> {
  return JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url').toString()) as Record<string, unknown>
}

t.test('npm run token -- --sub u1 opens a stream; --roles publisher publishes to it; a user token may not', async (t) => {
  const { url } = await startGateway(t)
  const user = await mint(['--sub', 'u-script'])
  const publisher = await mint(['--sub', 'backend', '--roles', 'publisher'])
  const payload = claimsOf(publisher)
  t.same(payload.roles, ['publisher'])
  t.equal(payload.sub, 'backend')

  const { stream, connected } = await openConnected(`${url}/v1/stream?token=${user}`, { t })
  t.equal(connected.userId, 'u-script', 'the stream belongs to --sub')
  const answer = await publish(url, publisher, { to: { user: 'u-script' }, event: 'hello', data: 'from the script' })
  t.equal(answer.status, 202, 'a --roles publisher token publishes')
  t.equal((await stream.nextEvent('hello')).data, 'from the script')
  t.equal((await publish(url, user, { to: { user: 'u-script' }, data: 'x' })).status, 403, 'a token without the role is refused')
})

t.test('scripts/token.js refuses to mint without JWT_SECRET', async (t) => {
  const failed = await run(['--sub', 'u1'], {})
  t.not(failed.code, 0, 'it exits non-zero')
  t.match(failed.stderr, /JWT_SECRET/, 'and says which variable is missing')
})

t.test('--ttl in seconds sets exp that far after iat', async (t) => {
  const claims = claimsOf(await mint(['--sub', 'u1', '--ttl', '60']))
  t.equal(Number(claims.exp) - Number(claims.iat), 60)
  t.equal(claims.sub, 'u1')
})

t.test('a --ttl that is not whole seconds, or none after the flag, is refused with exit 1 and no token', async (t) => {
  for (const args of [['--ttl', '1h'], ['--ttl'], ['--ttl', '-5']]) {
    const minted = await run(args)
    t.equal(minted.code, 1, `${args.join(' ')}: exit 1`)
    t.equal(minted.stdout, '', 'no token')
    t.match(minted.stderr, /--ttl takes whole seconds/)
  }
})

t.test('--help prints the usage; an unknown option (a typo such as --role) is refused with exit 1 and no token', async (t) => {
  const help = await run(['--help'])
  t.equal(help.code, 0)
  t.match(help.stdout, /^usage: .*--roles publisher,admin/)
  for (const args of [['--role', 'publisher'], ['--sub', 'u1', '--user', 'u2'], ['u1']]) {
    const minted = await run(args)
    t.equal(minted.code, 1, `${args.join(' ')}: exit 1`)
    t.equal(minted.stdout, '', 'no token')
    t.match(minted.stderr, /^unknown option "/)
  }
})
