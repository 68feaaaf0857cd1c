/**
 * `npm run token` (scripts/token.js), as the README shows it: tokens it mints
 * with the configured secret open streams and, with `--roles publisher`,
 * publish; without that role a publish is refused.
 */
import t from 'tap'
import { execFile } from 'node:child_process'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { openConnected, publish, startGateway, TEST_SECRET } from './helpers'

const SCRIPT = join(__dirname, '..', '..', 'scripts', 'token.js')

async function mint (args: string[]): Promise<string> {
  const { stdout } = await promisify(execFile)(process.execPath, [SCRIPT, ...args], { env: { PATH: process.env.PATH ?? '/usr/bin:/bin', JWT_SECRET: TEST_SECRET }, timeout: 15_000 })
  return stdout.trim()
}

t.test('npm run token -- --sub u1 opens a stream; --roles publisher publishes to it; a user token may not', async (t) => {
  const { url } = await startGateway(t)
  const user = await mint(['--sub', 'u-script'])
  const publisher = await mint(['--sub', 'backend', '--roles', 'publisher'])
  const payload = JSON.parse(Buffer.from(publisher.split('.')[1], 'base64url').toString()) as { sub: string, roles: string[], exp: number }
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
  const failed = await promisify(execFile)(process.execPath, [SCRIPT, '--sub', 'u1'], { env: { PATH: process.env.PATH ?? '/usr/bin:/bin' }, timeout: 15_000 })
    .then(() => null, (error: { code?: number, stderr?: string }) => error)
  t.ok(failed !== null, 'it exits non-zero')
  t.match(failed?.stderr ?? '', /JWT_SECRET/, 'and says which variable is missing')
})
